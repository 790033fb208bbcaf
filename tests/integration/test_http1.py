"""The dispatcher's HTTP/1.1 client against servers on loopback that answer as real
servers do, and as broken ones do: connections reused, closed between requests, closed
in the middle of an answer, chunked and endless bodies, interim answers, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from dispatcher.http1 import Answer, Client, HttpError, Target, allowed_address
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


async def _post_once(raw: bytes, *, timeout: float = 5, keep: int = 1024) -> Answer | str:
    """``raw`` as the answer to one POST: the answer, or the error's message."""

    async def scripted(n, reader, writer):
        writer.write(raw)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        await asyncio.sleep(0.05)
        return False

    async with Scripted(scripted).running() as server:
        client = Client()
        try:
            return await asyncio.wait_for(client.post(server.url, b"{}", {}, keep=keep), timeout)
        except HttpError as exc:
            return str(exc)
        finally:
            await client.close()


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "in the middle of the answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000, "head is too long"),
    ],
    ids=["not-http", "cut-short", "bad-length", "bad-header", "bad-chunk", "endless-head"],
)
async def test_a_broken_answer_is_a_clear_error(raw, error):
    got = await _post_once(raw)
    assert isinstance(got, str) and error in got, got


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
            "header x holds a control character"
        )
    finally:
        await sender.close()


def test_private_addresses_are_told_apart():
    assert allowed_address("127.0.0.1", loopback=True) and allowed_address("93.184.216.34", loopback=False)
    for private in ("10.1.2.3", "192.168.0.9", "169.254.169.254", "fd00::1", "100.64.0.1", "0.0.0.0", "::"):
        assert not allowed_address(private, loopback=True), private


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
    assert Target.parse("https://example.test/a%20b?q=1#frag").head == (
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


# --- a hostile or broken receiver (each found by a review of this client) ---


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        # a negative size once let the body grow without bound until the timeout
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-7FFFFFFF\r\n7FFFFFFF\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nok\r\n0\r\n\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\nok\r\n0\r\n\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXY0\r\n\r\n", "not followed by CRLF"),
        # these raised ValueError or UnicodeError out of a post that must not raise
        ("HTTP/1.1 200 OK\r\nContent-Length: ²\r\n\r\n".encode("latin-1"), "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 " + b"2" * 5000 + b" OK\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 000 Weird\r\nContent-Length: 0\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 0200 OK\r\nContent-Length: 0\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 2\r\n\r\nok", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: a\r\n Content-Length: 0\r\n\r\nhello", "folded"),
        (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok", "malformed header"),
        (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", "bare LF"),
        (b"HTTP/1.1 103 Early Hints\r\n\r\n" * 11, "more than 10 interim"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100_000 + b"\r\n\r\n", "head is too long"),
    ],
    ids=[
        "negative-chunk",
        "hex-prefix-chunk",
        "signed-chunk",
        "chunk-without-crlf",
        "superscript-length",
        "5000-digit-length",
        "5000-digit-status",
        "status-000",
        "status-0200",
        "two-lengths",
        "folded-line",
        "space-before-colon",
        "bare-lf",
        "endless-interim",
        "long-head-in-one-read",
    ],
)
async def test_a_hostile_answer_is_a_clear_error_and_nothing_else(raw, error):
    got = await _post_once(raw)
    assert isinstance(got, str) and error in got, got


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 999\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"ok",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: x-notchunked\r\n\r\nraw", b"raw"),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\nok", b"ok"),
        (
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            b"ok",
        ),
    ],
    ids=["chunked-and-length", "other-coding", "close-in-a-list", "close-repeated"],
)
async def test_an_answer_that_asks_for_it_closes_the_connection(raw, body):
    async def scripted(n, reader, writer):
        if n > 1:
            return answer(writer, OK)
        writer.write(raw)
        await writer.drain()
        return b"x-notchunked" not in raw  # a body read until the close: the server closes

    async with Scripted(scripted).running() as server:
        client = Client()
        try:
            first = await client.post(server.url, b"{}", {}, keep=1024)
            second = await client.post(server.url, b"{}", {}, keep=1024)
        finally:
            await client.close()
    assert (first.status, first.body, second.body) == (200, body, b"ok")
    assert server.connections == 2 and len(server.requests) == 2  # not reused, nothing sent twice


async def test_an_answer_flooding_chunk_extensions_is_cut_short_not_read_until_the_timeout():
    flood = b"1;" + b"x" * 4000 + b"\r\na\r\n"

    async def extensions(n, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(100_000):
                writer.write(flood)
                await writer.drain()
        return False

    async with Scripted(extensions).running() as server:
        client = Client()
        try:
            got = await asyncio.wait_for(client.post(server.url, b"{}", {}, keep=1024), 10)
        finally:
            await client.close()
    assert got.status == 200 and got.body.startswith(b"aaaa")


async def test_a_long_chunk_still_gives_the_first_bytes_of_the_answer():
    async def late_data(n, reader, writer):
        writer.write(b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % 131_072)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"e" * 131_072 + b"\r\n0\r\n\r\n")
        return True

    async with Scripted(late_data).running() as server:
        client = Client()
        try:
            got = await client.post(server.url, b"{}", {}, keep=1024)
        finally:
            await client.close()
    assert (got.status, got.body) == (500, b"e" * 1024)


@pytest.mark.parametrize("case", ["interim-then-close", "held-then-close"])
async def test_a_request_the_receiver_may_have_handled_is_not_sent_again(case):
    async def first_ok_then_trouble(n, reader, writer):
        if n == 1:
            return answer(writer, OK)
        if case == "interim-then-close":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        else:
            await asyncio.sleep(0.6)  # handled, then the receiver crashed
        return False

    async with Scripted(first_ok_then_trouble).running() as server:
        client = Client()
        try:
            assert (await client.post(server.url, b"{}", {}, keep=1024)).status == 200
            with pytest.raises(HttpError):
                await client.post(server.url, b"{}", {}, keep=1024)
        finally:
            await client.close()
    assert len(server.requests) == 2  # the second one once


async def test_idle_connections_close_after_their_time_and_on_bytes_nobody_asked_for(monkeypatch):
    from dispatcher import http1

    monkeypatch.setattr(http1, "IDLE_SECONDS", 0.2)
    closed = asyncio.Event()

    async def then_watch(n, reader, writer):
        answer(writer, OK)
        if n == 1:  # idle: see whether the client lets go of it
            assert await reader.read(1) == b""
            closed.set()
            return False
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nunasked")  # while idle
        await writer.drain()
        return True

    async with Scripted(then_watch).running() as server:
        client = Client()
        try:
            await client.post(server.url, b"{}", {}, keep=1024)
            await asyncio.wait_for(closed.wait(), 5)  # closed by the client after 0.2 s idle
            await client.post(server.url, b"{}", {}, keep=1024)  # a new connection, then extra bytes
            await asyncio.sleep(0.1)
            third = await client.post(server.url, b"{}", {}, keep=1024)
        finally:
            await client.close()
    assert third.body == b"ok"  # not the unasked answer
    assert server.connections == 3


def test_private_addresses_inside_ipv6_and_names_pointing_at_loopback_are_refused():
    for address in ("64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1", "::a00:1", "64:ff9b:1::a00:1", "224.0.0.1"):
        assert not allowed_address(address, loopback=True), address
    assert allowed_address("::1", loopback=True) and not allowed_address("::1", loopback=False)
    assert allowed_address("64:ff9b::5db8:d822", loopback=False)  # 93.184.216.34 through NAT64


async def test_refusing_private_networks_refuses_a_name_that_resolves_to_loopback(monkeypatch):
    real = socket.getaddrinfo

    def dns(host, port, *args, **kwargs):
        if host in ("rebound.test", "dual.test"):
            return real("127.0.0.1", port, *args, **kwargs)
        if host == "missing.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", dns)

    async def ok(n, reader, writer):
        return answer(writer, OK)

    async with Scripted(ok).running() as server:
        guarded, open_ = Sender(2, concurrency=1, refuse_private=True), Sender(2, concurrency=1)
        try:
            refused = await guarded.post(f"http://rebound.test:{server.port}/", b"{}", {})
            missing = await guarded.post(f"http://missing.test:{server.port}/", b"{}", {})
            allowed = await open_.post(f"http://rebound.test:{server.port}/", b"{}", {})
        finally:
            await guarded.close()
            await open_.close()
    assert "resolves only to private addresses" in (refused.error or "")
    assert "cannot resolve missing.test" in (missing.error or "")
    assert allowed.status == 200


async def test_a_dead_first_address_does_not_cost_the_delivery(monkeypatch):
    async def ok(n, reader, writer):
        return answer(writer, OK)

    async with Scripted(ok).running() as server:
        # a listener on 127.0.0.2 whose accept queue is full drops further SYNs, as a
        # firewalled first address (a broken IPv6 path) would
        hole = socket.socket()
        hole.bind(("127.0.0.2", server.port))
        hole.listen(0)
        fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.2", server.port))
            fillers.append(filler)
        real = socket.getaddrinfo

        def dns(host, port, *args, **kwargs):
            if host == "dual.test":
                return real("127.0.0.2", port, *args, **kwargs) + real("127.0.0.1", port, *args, **kwargs)
            return real(host, port, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", dns)
        sender = Sender(3, concurrency=1)
        try:
            got = await sender.post(f"http://dual.test:{server.port}/", b"{}", {})
        finally:
            await sender.close()
            for filler in fillers:
                filler.close()
            hole.close()
    assert got.status == 200 and got.duration_ms < 3000


async def test_a_slow_name_server_for_one_endpoint_does_not_starve_the_others(monkeypatch):
    real = socket.getaddrinfo

    def dns(host, *args, **kwargs):
        if host == "slow.test":
            time.sleep(2)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", dns)

    async def ok(n, reader, writer):
        return answer(writer, OK)

    async with Scripted(ok).running() as server:
        sender = Sender(1.0, concurrency=16)
        try:
            slow = [asyncio.create_task(sender.post("http://slow.test/", b"{}", {})) for _ in range(8)]
            await asyncio.sleep(0.1)
            healthy = await sender.post(f"http://localhost:{server.port}/", b"{}", {})
            assert {a.error for a in await asyncio.gather(*slow)} == {"timeout"}
        finally:
            await sender.close()
    assert healthy.status == 200


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({"X-A: 1\r\nTransfer-Encoding": "chunked"}, "cannot be sent"),
        ({"Content-Length": "0"}, "cannot be sent"),
        ({"Host": "elsewhere"}, "cannot be sent"),
        ({"x-a": "a\x00b"}, "control character"),
        ({"webhook-signature": "v1,SECRET€"}, "outside latin-1"),
    ],
    ids=["crlf-in-name", "framing-header", "host-header", "nul-in-value", "not-latin-1"],
)
async def test_request_headers_cannot_break_the_request(headers, error):
    client = Client()
    try:
        with pytest.raises(HttpError, match=error) as raised:
            await client.post("http://127.0.0.1:9/hook", b"{}", headers, keep=10)
    finally:
        await client.close()
    assert "SECRET" not in str(raised.value)  # a value never lands in the message


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://user:s3cret@example.test/hook", "user name or password"),
        ("http://example.test:0/hook", "bad port"),
        ("http://[fe80::1%25eth0]:8080/", "zone"),
        ("http://" + "a" * 64 + ".test/", "host name that is not valid"),
        ("http://a..b/", "host name that is not valid"),
        # no scheme: named as written, not as "://127.0.0.1:9002/hook"
        ("127.0.0.1:9002/hook", "'127.0.0.1:9002/hook?…' is not an http(s) URL"),
        ("user:s3cret@example.test/hook", "'example.test/hook?…' is not an http(s) URL"),
    ],
)
def test_urls_that_cannot_be_requests_are_refused_without_showing_secrets(url, error):
    with pytest.raises(HttpError, match=re.escape(error)) as raised:
        Target.parse(url + "?token=abc")
    assert "s3cret" not in str(raised.value) and "token=abc" not in str(raised.value)


def test_a_lone_percent_is_encoded():
    assert Target.parse("http://example.test/100%/x?q=%zz&r=%41").head.startswith(
        b"POST /100%25/x?q=%25zz&r=%41 HTTP/1.1\r\n"
    )


@contextlib.contextmanager
def black_hole(port: int) -> Iterator[str]:
    """127.0.0.2:port, a listener whose accept queue is full: connecting hangs."""
    hole = socket.socket()
    hole.bind(("127.0.0.2", port))
    hole.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.2", port))
        fillers.append(filler)
    try:
        yield "127.0.0.2"
    finally:
        for filler in fillers:
            filler.close()
        hole.close()


async def test_the_timeout_covers_connecting_and_a_receiver_that_never_reads():
    async def never_reads(n, reader, writer):
        await asyncio.sleep(5)
        return False

    async with Scripted(never_reads).running() as server:
        sender = Sender(0.4, concurrency=2)
        try:
            with black_hole(server.port) as host:
                started = time.monotonic()
                hung = await sender.post(f"http://{host}:{server.port}/", b"{}", {})
            stuck = await sender.post(server.url, b"x" * 8_000_000, {})  # fills the socket buffers
            elapsed = time.monotonic() - started
        finally:
            await sender.close()
    assert (hung.status, hung.error) == (0, "timeout") and (stuck.status, stuck.error) == (0, "timeout")
    assert elapsed < 3  # each ended near its 0.4 s, not when the receiver gave up
    assert not sender.client._open  # the timed-out connections were closed
