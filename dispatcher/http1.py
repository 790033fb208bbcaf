"""A lean HTTP/1.1 client for webhook POSTs: keep-alive connections per origin, the
request written as one block of bytes, the answer read for its status, its headers and
the first bytes of its body.

Why not aiohttp's client: a delivery needs none of its generality (cookies, redirects,
multipart, decompression, proxies), and on the dispatcher's event loop its per-request
cost was about half of the loop's time (docs/benchmarks.md, issue 15).  What is kept:
TLS verified against the system's trust store, one timeout over the whole exchange
(connect included), no redirects followed, and a resolver that can refuse private
addresses.

A connection is reused only when the answer said so (HTTP/1.1 without
``Connection: close``) and its body was read to the end (at most :data:`DRAIN_BYTES`; a
longer body closes the connection instead).  A request sent on a reused connection that
the server had already closed (no byte of an answer came back) is sent once more on a new
connection: receivers deduplicate by ``webhook-id``, and the request is either refused
before being read or sent again, as any retry would.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

HEAD_BYTES = 64 * 1024  # the status line and headers of an answer, at most
DRAIN_BYTES = 64 * 1024  # a body up to this is read to the end so the connection is reused
READ_PAUSE_BYTES = 256 * 1024  # stop reading the socket while this much waits unread
IDLE_SECONDS = 15.0  # an idle connection older than this is closed instead of reused
_SAFE_PATH = "/%:@!$&'()*+,;=-._~?"


class HttpError(Exception):
    """The exchange failed without an HTTP answer; the message says why, for the log."""


class _Stale(Exception):
    """A reused connection was closed by the server before any byte of the answer."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes  # the first ``keep`` bytes


@dataclass(frozen=True, slots=True)
class Target:
    """A URL taken apart once: where to connect and the request's first lines."""

    tls: bool
    host: str
    port: int
    head: bytes  # "POST <path> HTTP/1.1\r\nHost: <host>\r\n"

    @property
    def origin(self) -> tuple[bool, str, int]:
        return (self.tls, self.host, self.port)

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HttpError(f"{url!r} is not an http(s) URL")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        host = parts.hostname
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        path = quote(parts.path or "/", safe=_SAFE_PATH)
        if parts.query:
            path += "?" + quote(parts.query, safe=_SAFE_PATH)
        authority = f"[{host}]" if ":" in host else host
        if port != (443 if tls else 80):
            authority += f":{port}"
        head = f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n".encode("ascii")
        return cls(tls, host, port, head)


def allowed_address(address: str) -> bool:
    """Whether a resolved address may be used when private networks are refused:
    loopback (local receivers) and global addresses only."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return ip.is_loopback or ip.is_global


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: bytes in a buffer, a future to wait for more."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        self.error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_PAUSE_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def more(self) -> None:
        """Wait until more bytes arrive; :class:`ConnectionError` once none can."""
        if self.closed:
            if self.error is not None:
                raise ConnectionError(_describe(self.error))
            raise ConnectionError("closed by the server")
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Client:
    """Keep-alive connections per origin; one request at a time on each connection.
    How many run at once is the caller's to bound (the dispatcher's concurrency)."""

    def __init__(self, *, refuse_private: bool = False, max_idle: int = 64) -> None:
        self._refuse_private = refuse_private
        self._max_idle = max_idle
        self._idle: dict[tuple[bool, str, int], list[_Connection]] = {}
        self._targets: dict[str, Target] = {}
        self._ssl: ssl.SSLContext | None = None
        self._open: set[_Connection] = set()

    def target(self, url: str) -> Target:
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = Target.parse(url)
        return target

    async def post(self, url: str, body: bytes, headers: dict[str, str], *, keep: int) -> Answer:
        """POST ``body``; the answer with the first ``keep`` bytes of its body.  Raises
        :class:`HttpError` (and ``TimeoutError`` / cancellation from the caller's
        timeout) when no answer came."""
        target = self.target(url)
        request = _request(target, body, headers)
        conn = self._take_idle(target.origin)
        if conn is not None:
            try:
                return await self._exchange(target, conn, request, keep)
            except _Stale:
                pass  # the server had closed it: once more on a new connection
        conn = await self._connect(target)
        try:
            return await self._exchange(target, conn, request, keep)
        except _Stale as exc:
            raise HttpError(f"connection closed before an answer ({exc})") from None

    async def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()

    def _take_idle(self, origin: tuple[bool, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS and not conn.buffer:
                return conn
            self._discard(conn)
        return None

    def _give_back(self, origin: tuple[bool, str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if conn.closed or len(idle) >= self._max_idle:
            self._discard(conn)
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)

    async def _connect(self, target: Target) -> _Connection:
        loop = asyncio.get_running_loop()
        context = self._tls() if target.tls else None
        hosts = [target.host]
        if self._refuse_private:
            infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
            hosts = list(dict.fromkeys(str(info[4][0]) for info in infos if allowed_address(str(info[4][0]))))
            if not hosts:
                raise HttpError(f"{target.host} resolves only to private addresses, which are refused")
        failure: Exception | None = None
        for host in hosts:
            try:
                _, conn = await loop.create_connection(
                    _Connection,
                    host,
                    target.port,
                    ssl=context,
                    server_hostname=target.host if context is not None else None,
                )
            except (OSError, ssl.SSLError) as exc:
                failure = exc
                continue
            self._open.add(conn)
            return conn
        assert failure is not None
        raise HttpError(f"cannot connect to {target.host}:{target.port}: {_describe(failure)}") from failure

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _exchange(self, target: Target, conn: _Connection, request: bytes, keep: int) -> Answer:
        reusable = False
        try:
            assert conn.transport is not None
            conn.transport.write(request)
            try:
                status, version, headers = await _read_head(conn)
            except ConnectionError as exc:
                if conn.buffer:
                    raise
                raise _Stale(str(exc)) from None
            body, complete = await _read_body(conn, status, headers, keep)
            reusable = (
                complete
                and version == b"HTTP/1.1"
                and headers.get("connection", "").lower() != "close"
                and not conn.buffer
            )
            return Answer(status, headers, body)
        except ConnectionError as exc:
            raise HttpError(f"connection lost in the middle of the answer: {exc}") from exc
        finally:
            if reusable:
                self._give_back(target.origin, conn)
            else:
                self._discard(conn)


def _request(target: Target, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [target.head]
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            raise HttpError(f"header {name} holds a line break")
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
    lines.append(body)
    return b"".join(lines)


async def _read_head(conn: _Connection) -> tuple[int, bytes, dict[str, str]]:
    """The status line and headers of the final answer (interim 1xx answers skipped)."""
    while True:
        end = conn.buffer.find(b"\r\n\r\n")
        while end < 0:
            if len(conn.buffer) > HEAD_BYTES:
                raise HttpError("the answer's headers are too long")
            await conn.more()
            end = conn.buffer.find(b"\r\n\r\n")
        head = bytes(conn.buffer[:end])
        del conn.buffer[: end + 4]
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise HttpError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
        status = int(parts[1])
        if 100 <= status < 200 and status != 101:
            continue  # 100 Continue, 103 Early Hints: the answer follows
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise HttpError(f"malformed header line in the answer: {line[:80]!r}")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        return status, parts[0], headers


async def _read_body(
    conn: _Connection, status: int, headers: dict[str, str], keep: int
) -> tuple[bytes, bool]:
    """The first ``keep`` bytes of the body, and whether the body was read to its end (so
    the connection can carry the next request)."""
    if status in (101, 204, 304):
        return b"", status != 101
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(conn, keep)
    length_text = headers.get("content-length")
    if length_text is None:  # the body runs until the server closes
        while len(conn.buffer) < keep and not conn.closed:
            await _more_or_end(conn)
        return bytes(conn.buffer[:keep]), False
    if not length_text.isdigit():
        raise HttpError(f"bad Content-Length in the answer: {length_text[:40]!r}")
    length = int(length_text)
    want = length if length <= DRAIN_BYTES else min(length, keep)
    while len(conn.buffer) < want:
        await conn.more()
    body = bytes(conn.buffer[: min(keep, length)])
    if length > DRAIN_BYTES:
        return body, False
    del conn.buffer[:length]
    return body, True


async def _read_chunked(conn: _Connection, keep: int) -> tuple[bytes, bool]:
    kept = bytearray()
    read = 0
    while True:
        end = conn.buffer.find(b"\r\n")
        while end < 0:
            if len(conn.buffer) > HEAD_BYTES:
                raise HttpError("bad chunk in the answer")
            await conn.more()
            end = conn.buffer.find(b"\r\n")
        size_text = bytes(conn.buffer[:end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpError(f"bad chunk size in the answer: {size_text[:20]!r}") from None
        del conn.buffer[: end + 2]
        if size == 0:  # trailers, then the blank line
            while True:
                end = conn.buffer.find(b"\r\n")
                while end < 0:
                    if len(conn.buffer) > HEAD_BYTES:
                        raise HttpError("the answer's trailers are too long")
                    await conn.more()
                    end = conn.buffer.find(b"\r\n")
                del conn.buffer[: end + 2]
                if end == 0:
                    return bytes(kept), True
        read += size
        if read > DRAIN_BYTES:  # too long to read through: what came of it, and close
            kept += conn.buffer[: min(size, max(0, keep - len(kept)))]
            return bytes(kept), False
        while len(conn.buffer) < size + 2:
            await conn.more()
        if len(kept) < keep:
            kept += conn.buffer[: min(size, keep - len(kept))]
        del conn.buffer[: size + 2]


async def _more_or_end(conn: _Connection) -> None:
    try:
        await conn.more()
    except ConnectionError:
        return


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:400]
