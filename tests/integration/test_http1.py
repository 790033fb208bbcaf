"""The dispatcher's HTTP/1.1 client against servers on loopback that answer as real
servers do, and as broken ones do: connections reused, closed between requests, closed
in the middle of an answer, chunked and endless bodies, interim answers, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from dispatcher.http1 import Client, HttpError, Target, allowed_address
from dispatcher.sender import Sender

Script = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class Scripted:
    """A TCP server that reads each request (head + Content-Length body) and answers as
    ``script(n, reader, writer)`` says; the script returns False to close the connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.CancelledError:  # the server is closing under an idle connection
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.requests.append(head + await reader.readexactly(length))
                if not await self.script(len(self.requests), reader, writer):
                    return
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self, tls: ssl.SSLContext | None = None) -> AsyncIterator[Scripted]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?x=1"


def answer(writer: asyncio.StreamWriter, raw: bytes) -> bool:
    writer.write(raw)
    return True


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_connections_are_reused_and_the_request_is_well_formed():
    async def ok(n, reader, writer):
        return answer(writer, OK)

    async with Scripted(ok).running() as server:
        client = Client()
        try:
            for i in range(20):
                got = await client.post(server.url, b'{"i":%d}' % i, {"webhook-id": f"evt_{i}"}, keep=1024)
                assert (got.status, got.body) == (200, b"ok")
        finally:
            await client.close()
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /hook?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % server.port)
    assert b"webhook-id: evt_0\r\n" in first and first.endswith(b'Content-Length: 7\r\n\r\n{"i":0}')


async def test_a_connection_the_server_closed_is_replaced_without_a_failure():
    # the server answers, then closes (as an idle timeout would); the next POST finds the
    # connection dead and goes through on a new one
    async def once(n, reader, writer):
        writer.write(OK)
        await writer.drain()
        return False

    async with Scripted(once).running() as server:
        client = Client()
        try:
            for _ in range(5):
                assert (await client.post(server.url, b"{}", {}, keep=1024)).status == 200
                await asyncio.sleep(0.01)
        finally:
            await client.close()
    assert server.connections == 5 and len(server.requests) == 5


async def test_a_server_closing_right_after_reading_is_sent_once_more_then_fails():
    # a reused connection closed before any answer: sent again on a new connection; a new
    # connection closed before any answer: a failure that says so
    async def close_after_first(n, reader, writer):
        if n == 1:
            return answer(writer, OK)
        return False

    async with Scripted(close_after_first).running() as server:
        client = Client()
        try:
            assert (await client.post(server.url, b"{}", {}, keep=1024)).status == 200
            with pytest.raises(HttpError, match="closed before an answer"):
                await client.post(server.url, b"{}", {}, keep=1024)
        finally:
            await client.close()
    assert len(server.requests) == 3  # the first, and the second sent twice


@pytest.mark.parametrize(
    ("raw", "body", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nyes", b"yes", True),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n",
            b"abcde",
            True,
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
    ],
    ids=["connection-close", "no-content", "interim-answer", "chunked", "http-1.0"],
)
async def test_answers_are_read_to_their_end_and_reuse_follows_them(raw, body, reused):
    async def scripted(n, reader, writer):
        return answer(writer, raw)

    async with Scripted(scripted).running() as server:
        client = Client()
        try:
            for _ in range(2):
                got = await client.post(server.url, b"{}", {}, keep=1024)
                assert got.status in (200, 201, 204) and got.body == body
        finally:
            await client.close()
    assert server.connections == (1 if reused else 2)


@pytest.mark.parametrize("framing", ["length", "chunked", "until-close"])
async def test_a_huge_answer_keeps_its_first_bytes_and_does_not_hold_the_connection(framing):
    big = b"x" * 3_000_000

    async def huge(n, reader, writer):
        if framing == "length":
            writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
        elif framing == "chunked":
            writer.write(b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(30):
                writer.write(b"%x\r\n" % 100_000 + big[:100_000] + b"\r\n")
            writer.write(b"0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 500 Oops\r\n\r\n" + big)
            await writer.drain()
            return False
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        return True

    async with Scripted(huge).running() as server:
        client = Client()
        try:
            for _ in range(2):
                got = await asyncio.wait_for(client.post(server.url, b"{}", {}, keep=1024), 10)
                assert got.status == 500 and got.body == b"x" * 1024
        finally:
            await client.close()
    assert server.connections == 2  # the rest of the body was not read: a new connection


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "in the middle of the answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000, "headers are too long"),
    ],
    ids=["not-http", "cut-short", "bad-length", "bad-header", "bad-chunk", "endless-head"],
)
async def test_a_broken_answer_is_a_clear_error(raw, error):
    async def broken(n, reader, writer):
        writer.write(raw)
        await writer.drain()
        return False

    async with Scripted(broken).running() as server:
        client = Client()
        try:
            with pytest.raises(HttpError, match=error):
                await asyncio.wait_for(client.post(server.url, b"{}", {}, keep=1024), 10)
        finally:
            await client.close()


async def test_sender_turns_every_failure_into_an_attempt():
    sender = Sender(0.3, concurrency=4)
    try:
        refused = await sender.post("http://127.0.0.1:9/hook", b"{}", {})
        assert refused.status == 0 and "cannot connect to 127.0.0.1:9" in (refused.error or "")

        async def hang(n, reader, writer):
            await asyncio.sleep(5)
            return False

        async with Scripted(hang).running() as server:
            slow = await sender.post(server.url, b"{}", {})
        assert (slow.status, slow.error) == (0, "timeout")

        async def limited(n, reader, writer):
            return answer(
                writer, b"HTTP/1.1 429 Slow Down\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nwait"
            )

        async with Scripted(limited).running() as server:
            got = await sender.post(server.url, b"{}", {})
        assert (got.status, got.error, got.response, got.retry_after) == (429, "HTTP 429", "wait", "7")
        assert (await sender.post(server.url, b"{}", {"x": "a\r\nInjected: 1"})).error == (
            "header x holds a line break"
        )
    finally:
        await sender.close()


def test_private_addresses_are_told_apart():
    assert allowed_address("127.0.0.1") and allowed_address("::1") and allowed_address("93.184.216.34")
    for private in ("10.1.2.3", "192.168.0.9", "169.254.169.254", "fd00::1", "100.64.0.1", "0.0.0.0"):
        assert not allowed_address(private), private


async def test_refusing_private_networks_still_reaches_loopback_by_name():
    async def ok(n, reader, writer):
        return answer(writer, OK)

    async with Scripted(ok).running() as server:
        client = Client(refuse_private=True)
        try:
            got = await client.post(f"http://localhost:{server.port}/hook", b"{}", {}, keep=1024)
        finally:
            await client.close()
    assert got.status == 200 and b"Host: localhost:%d" % server.port in server.requests[0]


def test_urls_become_request_lines():
    assert Target.parse("https://example.test/a b?q=1#frag").head == (
        b"POST /a%20b?q=1 HTTP/1.1\r\nHost: example.test\r\n"
    )
    assert Target.parse("http://[::1]:8080").head == b"POST / HTTP/1.1\r\nHost: [::1]:8080\r\n"
    assert Target.parse("https://bücher.test/é").head == (
        b"POST /%C3%A9 HTTP/1.1\r\nHost: xn--bcher-kva.test\r\n"
    )
    with pytest.raises(HttpError):
        Target.parse("ftp://example.test/")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_is_verified_against_the_trust_store(certificate, monkeypatch):
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def ok(n, reader, writer):
        return answer(writer, OK)

    async with Scripted(ok).running(tls=context) as server:
        url = f"https://localhost:{server.port}/hook"
        untrusting = Sender(5, concurrency=1)
        try:
            refused = await untrusting.post(url, b"{}", {})
        finally:
            await untrusting.close()
        assert refused.status == 0 and "CERTIFICATE_VERIFY_FAILED" in (refused.error or "")

        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the system's trust store, here
        trusting = Sender(5, concurrency=1)
        try:
            for _ in range(3):
                got = await trusting.post(url, b"{}", {})
                assert (got.status, got.response) == (200, "ok")
        finally:
            await trusting.close()
    assert server.connections == 1  # one kept alive (the refused handshake never got this far)


async def test_concurrent_posts_to_an_aiohttp_server_each_get_their_own_answer():
    seen: list[tuple[str, bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append((request.headers["webhook-id"], await request.read()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = Client()
    try:
        answers = await asyncio.gather(
            *[
                client.post(f"http://127.0.0.1:{port}/hook", b"%d" % i, {"webhook-id": f"evt_{i}"}, keep=10)
                for i in range(200)
            ]
        )
    finally:
        await client.close()
        await runner.cleanup()
    assert {a.status for a in answers} == {200}
    assert sorted(seen) == sorted((f"evt_{i}", b"%d" % i) for i in range(200))
