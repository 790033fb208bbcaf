"""A lean HTTP/1.1 client for webhook POSTs: keep-alive connections per origin, the
request written as one block of bytes, the answer read for its status, its headers and
the first bytes of its body.

Why not aiohttp's client: a delivery needs none of its generality (cookies, redirects,
multipart, decompression, proxies), and on the dispatcher's event loop its per-request
cost was about half of the loop's time (docs/benchmarks.md, issue 15).  What is kept:
TLS verified against the system's trust store, one timeout over the whole exchange
(the caller's, connect included), no redirects followed, addresses raced 250 ms apart
(Happy Eyeballs), and private addresses refused on request.

The receiver is not trusted: every byte of an answer counts against
:data:`ANSWER_BYTES`; framing follows RFC 9112 strictly (one ``Content-Length``, a
3-digit status, ``chunked`` only as the last coding, no folded header lines); and a
connection is reused only when the answer said so and was read to its end (a body of at
most :data:`DRAIN_BYTES`).  A request sent on a reused connection that the server closes
at once, with no byte of an answer (it had closed the idle connection as the request
left), is sent once more on a new connection: receivers deduplicate by ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import aiohappyeyeballs

HEAD_BYTES = 64 * 1024  # the status line and headers of an answer, at most
DRAIN_BYTES = 64 * 1024  # a body up to this is read to the end so the connection is reused
ANSWER_BYTES = 2 * HEAD_BYTES + DRAIN_BYTES  # every byte of one answer on the wire, at most
LINE_BYTES = 4096  # a chunk-size line (with its extensions) or a trailer line, at most
MAX_INTERIM = 10  # 1xx answers before the final one, at most
READ_PAUSE_BYTES = 256 * 1024  # stop reading the socket while this much waits unread
IDLE_SECONDS = 15.0  # an idle connection is closed after this
STALE_SECONDS = 0.25  # a reused connection closed this soon after the request was stale
DNS_SECONDS = 10.0  # a host name's addresses are kept this long
HAPPY_EYEBALLS_SECONDS = 0.25
DEADLINE_TICK = 0.05
CACHED_LINE_BYTES = 200  # header lines up to this are parsed once and remembered  # how often exchanges past their deadline are looked for

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: .*)?", re.DOTALL)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SAFE_PATH = "/%:@!$&'()*+,;=-._~?"
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")


class HttpError(Exception):
    """The exchange failed without an HTTP answer; the message says why, for the log."""


class _Stale(Exception):
    """A reused connection was closed by the server at once, before any byte of an answer."""


class _Overrun(Exception):
    """The answer passed :data:`ANSWER_BYTES` on the wire."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes  # the first ``keep`` bytes


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_address(address: str, *, loopback: bool) -> bool:
    """Whether an address may be connected to when private networks are refused: global
    unicast addresses, and loopback only when ``loopback`` (the URL itself names a
    loopback host).  An IPv4 address inside IPv6 (mapped, NAT64, 6to4, compatible) is
    judged as that IPv4 address."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and not ip.is_loopback:
        if ip in _LOCAL_NAT64:
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and (ip in _NAT64 or ip in _V4_COMPATIBLE):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    if ip.is_loopback:
        return loopback
    return ip.is_global and not ip.is_multicast


def shown(url: str) -> str:
    """A URL for messages and logs: no user name, password, query or fragment."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:  # not a URL: shown as written, up to a query
        text, query, _ = url.partition("?")
        return text.rpartition("@")[2] + ("?…" if query else "")
    netloc = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{netloc}{parts.path}" + ("?…" if parts.query else "")


@dataclass(frozen=True, slots=True)
class Target:
    """A URL taken apart once: where to connect and the request's first lines."""

    tls: bool
    host: str
    port: int
    loopback: bool
    head: bytes  # "POST <path> HTTP/1.1\r\nHost: <host>\r\n"

    @property
    def origin(self) -> tuple[bool, str, int]:
        return (self.tls, self.host, self.port)

    @classmethod
    def parse(cls, url: str) -> Target:
        """Raises :class:`HttpError` for a URL that cannot be a request (the message
        shows the URL without credentials or query)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HttpError(f"{shown(url)!r} is not an http(s) URL")
        if parts.username is not None or parts.password is not None:
            raise HttpError(f"{shown(url)!r} holds a user name or password, which would not be sent")
        if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
            raise HttpError(f"{shown(url)!r} holds a space or a control character")
        tls = parts.scheme == "https"
        default = 443 if tls else 80
        try:
            port = parts.port if parts.port is not None else default
        except ValueError:
            raise HttpError(f"{shown(url)!r} has a bad port") from None
        if port == 0:
            raise HttpError(f"{shown(url)!r} has a bad port")
        host = parts.hostname
        if "%" in host:
            raise HttpError(f"{shown(url)!r}: IPv6 zone identifiers are not supported")
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise HttpError(f"{shown(url)!r} has a host name that is not valid") from None
        if any(not label or len(label) > 63 for label in host.rstrip(".").split(".")) and ":" not in host:
            raise HttpError(f"{shown(url)!r} has a host name that is not valid")
        path = quote(_LONE_PERCENT.sub("%25", parts.path or "/"), safe=_SAFE_PATH)
        if parts.query:
            path += "?" + quote(_LONE_PERCENT.sub("%25", parts.query), safe=_SAFE_PATH)
        authority = f"[{host}]" if ":" in host else host
        if port != default:
            authority += f":{port}"
        head = f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n".encode("ascii")
        return cls(tls, host, port, is_loopback(host), head)


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: bytes in a buffer, a future to wait for more."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.received = 0  # bytes of the current answer so far
        self.closed = False
        self.paused = False
        self.idle = False
        self.idle_since = 0.0
        self.timed_out = False
        self.error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.idle:  # an answer to no request: the connection cannot be trusted
            self.close()
            return
        self.buffer += data
        self.received += len(data)
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
        """Wait until more bytes arrive: :class:`ConnectionError` once none can,
        :class:`_Overrun` once the answer is past :data:`ANSWER_BYTES`."""
        if self.received > ANSWER_BYTES:
            raise _Overrun
        if self.closed:
            if self.error is not None:
                raise ConnectionError(f"{type(self.error).__name__}: {self.error}"[:300])
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
        self._wake()

    def abort(self) -> None:
        """Past its deadline: closed at once, whatever is left to write."""
        self.timed_out = self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._wake()


class _Resolver:
    """Host names to addresses on threads of its own (a slow name server holds up only
    lookups, never the loop's default executor), one lookup per name at a time, answers
    kept for :data:`DNS_SECONDS`."""

    def __init__(self) -> None:
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ct1-resolve")
        self._cache: dict[tuple[str, int], tuple[float, list[Any]]] = {}
        self._lookups: dict[tuple[str, int], asyncio.Future[list[Any]]] = {}

    async def resolve(self, host: str, port: int) -> list[Any]:
        key = (host, port)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        lookup = self._lookups.get(key)
        if lookup is None:
            loop = asyncio.get_running_loop()
            lookup = loop.run_in_executor(
                self._threads, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM
            )
            self._lookups[key] = lookup
            lookup.add_done_callback(lambda done: self._done(key, done))
        infos = await asyncio.shield(lookup)
        return infos

    def _done(self, key: tuple[str, int], lookup: asyncio.Future[list[Any]]) -> None:
        self._lookups.pop(key, None)
        if not lookup.cancelled() and lookup.exception() is None:
            self._cache[key] = (time.monotonic() + DNS_SECONDS, lookup.result())

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


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
        self._resolver = _Resolver()
        self._names: set[str] = set()  # header names already checked
        self._sweeper: asyncio.TimerHandle | None = None
        # exchanges under way and their deadlines: one timer looks at all of them, rather
        # than a timeout (two timer handles) per request
        self._deadlines: dict[_Connection, float] = {}
        self._watcher: asyncio.TimerHandle | None = None

    def target(self, url: str) -> Target:
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = Target.parse(url)
        return target

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], *, keep: int, timeout: float | None = None
    ) -> Answer:
        """POST ``body``; the answer with the first ``keep`` bytes of its body.  Raises
        :class:`HttpError` when no answer came, ``TimeoutError`` when none came within
        ``timeout`` seconds (connecting included; checked every :data:`DEADLINE_TICK`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        target = self.target(url)
        request = self._request(target, body, headers)
        conn = self._take_idle(target.origin)
        if conn is not None:
            try:
                return await self._exchange(target, conn, request, keep, reused=True, deadline=deadline)
            except _Stale:
                pass  # the server had closed it: once more on a new connection
        if deadline is None:
            conn = await self._connect(target)
        else:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                conn = await self._connect(target)
        return await self._exchange(target, conn, request, keep, reused=False, deadline=deadline)

    def _watch(self, conn: _Connection, deadline: float) -> None:
        self._deadlines[conn] = deadline
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().call_later(DEADLINE_TICK, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._watcher = None
        now = time.monotonic()
        for conn in [c for c, deadline in self._deadlines.items() if deadline <= now]:
            del self._deadlines[conn]
            conn.abort()
        if self._deadlines:
            self._watcher = asyncio.get_running_loop().call_later(DEADLINE_TICK, self._check_deadlines)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
        self._resolver.close()

    def _request(self, target: Target, body: bytes, headers: dict[str, str]) -> bytes:
        lines = [target.head]
        for name, value in headers.items():
            if name not in self._names:
                if not _TOKEN.fullmatch(name) or name.lower() in _FRAMING:
                    raise HttpError(f"header {name[:40]!r} cannot be sent")
                self._names.add(name)
            if _CTL.search(value):
                raise HttpError(f"header {name} holds a control character")
            try:
                lines.append(f"{name}: {value}\r\n".encode("latin-1"))
            except UnicodeEncodeError:
                raise HttpError(f"header {name} holds a character outside latin-1") from None
        lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
        lines.append(body)
        return b"".join(lines)

    def _take_idle(self, origin: tuple[bool, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            conn.idle = False
            if not conn.closed and not conn.buffer:
                return conn
            self._discard(conn)
        return None

    def _give_back(self, origin: tuple[bool, str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if conn.closed or len(idle) >= self._max_idle:
            self._discard(conn)
            return
        conn.idle = True
        conn.idle_since = time.monotonic()
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(IDLE_SECONDS / 4, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for :data:`IDLE_SECONDS` (one timer for all of them,
        not one per request)."""
        self._sweeper = None
        oldest = time.monotonic() - IDLE_SECONDS
        for idle in self._idle.values():
            for conn in [c for c in idle if c.idle_since <= oldest or c.closed]:
                idle.remove(conn)
                self._discard(conn)
        if any(self._idle.values()):
            self._sweeper = asyncio.get_running_loop().call_later(IDLE_SECONDS / 4, self._sweep)

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)

    async def _connect(self, target: Target) -> _Connection:
        where = f"{target.host}:{target.port}"
        try:
            infos = await self._resolver.resolve(target.host, target.port)
        except (OSError, UnicodeError) as exc:
            raise HttpError(f"cannot resolve {target.host}: {_describe(exc)}") from exc
        if self._refuse_private:
            infos = [i for i in infos if allowed_address(str(i[4][0]), loopback=target.loopback)]
            if not infos:
                raise HttpError(f"{target.host} resolves only to private addresses, which are refused")
        loop = asyncio.get_running_loop()
        context = self._tls() if target.tls else None
        try:
            sock = await aiohappyeyeballs.start_connection(
                infos, happy_eyeballs_delay=HAPPY_EYEBALLS_SECONDS, interleave=1
            )
        except OSError as exc:
            raise HttpError(f"cannot connect to {where}: {_describe(exc)}") from exc
        try:
            _, conn = await loop.create_connection(
                _Connection,
                sock=sock,
                ssl=context,
                server_hostname=target.host if context is not None else None,
            )
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise HttpError(f"cannot connect to {where}: {_describe(exc)}") from exc
        except BaseException:
            sock.close()
            raise
        self._open.add(conn)
        return conn

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _exchange(
        self,
        target: Target,
        conn: _Connection,
        request: bytes,
        keep: int,
        *,
        reused: bool,
        deadline: float | None,
    ) -> Answer:
        reusable = False
        if deadline is not None:
            self._watch(conn, deadline)
        try:
            assert conn.transport is not None
            conn.received = 0
            sent_at = time.monotonic()
            conn.transport.write(request)
            try:
                head = await _read_head(conn)
            except ConnectionError as exc:
                if conn.timed_out:
                    raise TimeoutError from None
                if conn.received:
                    raise HttpError(f"connection lost in the middle of the answer: {exc}") from None
                if reused and time.monotonic() - sent_at < STALE_SECONDS:
                    raise _Stale from None
                raise HttpError(f"connection closed before an answer ({exc})") from None
            except _Overrun:
                raise HttpError("the answer's head is too long (or too many interim answers)") from None
            try:
                body, complete = await _read_body(conn, head, keep)
            except ConnectionError as exc:
                if conn.timed_out:
                    raise TimeoutError from None
                raise HttpError(f"connection lost in the middle of the answer: {exc}") from None
            except _Overrun:
                raise HttpError("the answer is too long") from None
            if conn.timed_out:
                raise TimeoutError
            reusable = complete and head.keep_alive and not conn.buffer
            return Answer(head.status, head.headers, body)
        finally:
            if deadline is not None:
                self._deadlines.pop(conn, None)
            if reusable:
                self._give_back(target.origin, conn)
            else:
                self._discard(conn)


@dataclass(frozen=True, slots=True)
class _Head:
    status: int
    headers: dict[str, str]
    keep_alive: bool  # HTTP/1.1, no "close" option, unambiguous framing
    framing: str  # "none", "length", "chunked", "close"
    length: int


async def _read_head(conn: _Connection) -> _Head:
    """The status line and headers of the final answer (interim 1xx answers skipped)."""
    for _ in range(MAX_INTERIM + 1):
        end = conn.buffer.find(b"\r\n\r\n")
        while end < 0:
            if len(conn.buffer) > HEAD_BYTES:
                raise HttpError("the answer's head is too long")
            if b"\n\n" in conn.buffer:
                raise HttpError("the answer's lines end in a bare LF, not CRLF")
            await conn.more()
            end = conn.buffer.find(b"\r\n\r\n")
        if end > HEAD_BYTES:
            raise HttpError("the answer's head is too long")
        lines = bytes(conn.buffer[:end]).split(b"\r\n")
        del conn.buffer[: end + 4]
        status, http11 = _status_line(lines[0])
        if status < 200 and status != 101:
            continue  # 100 Continue, 103 Early Hints: the answer follows
        return _parse_head(status, http11, lines[1:])
    raise HttpError(f"more than {MAX_INTERIM} interim (1xx) answers")


def _status_line(line: bytes) -> tuple[int, bool]:
    """(status, whether HTTP/1.1) of a status line."""
    if len(line) <= CACHED_LINE_BYTES:
        return _status_line_cached(line)
    return _parse_status_line(line)


def _parse_status_line(line: bytes) -> tuple[int, bool]:
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise HttpError(f"not an HTTP/1.x answer: {line[:80]!r}")
    return int(match[2]), match[1] == b"1"


def _header_line(line: bytes) -> tuple[str, str]:
    """A header line as (lower-case name, value)."""
    if len(line) <= CACHED_LINE_BYTES:
        return _header_line_cached(line)
    return _parse_header_line(line)


def _parse_header_line(line: bytes) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise HttpError("folded header line in the answer")
    raw_name, sep, raw_value = line.partition(b":")
    name = raw_name.decode("latin-1")
    if not sep or not _TOKEN.fullmatch(name):
        raise HttpError(f"malformed header line in the answer: {line[:80]!r}")
    return name.lower(), raw_value.strip(b" \t").decode("latin-1")


# A receiver answers with the same lines again and again (only Date changes, once a
# second): each distinct short line is parsed once (pure functions of the bytes; a
# hostile receiver can fill the caches with at most 1,024 lines of 200 bytes).
_status_line_cached = functools.lru_cache(maxsize=64)(_parse_status_line)
_header_line_cached = functools.lru_cache(maxsize=1024)(_parse_header_line)


def _parse_head(status: int, http11: bool, lines: list[bytes]) -> _Head:
    headers: dict[str, str] = {}
    lengths: list[str] = []
    for line in lines:
        name, value = _header_line(line)
        if name == "content-length":
            lengths.extend(v.strip() for v in value.split(","))
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    options = {o.strip().lower() for o in headers.get("connection", "").split(",")}
    keep_alive = http11 and "close" not in options
    codings = [c.strip().lower() for c in headers.get("transfer-encoding", "").split(",") if c.strip()]
    if status in (101, 204, 304):
        return _Head(status, headers, keep_alive and status != 101, "none", 0)
    if codings:  # Transfer-Encoding wins over Content-Length, and then the connection is closed
        framing = "chunked" if codings[-1] == "chunked" else "close"
        return _Head(status, headers, keep_alive and not lengths and framing == "chunked", framing, 0)
    if lengths:
        if any(not _DIGITS.fullmatch(v) for v in lengths) or len(set(lengths)) > 1:
            raise HttpError(f"bad Content-Length in the answer: {headers['content-length'][:40]!r}")
        return _Head(status, headers, keep_alive, "length", int(lengths[0]))
    return _Head(status, headers, False, "close", 0)


async def _read_body(conn: _Connection, head: _Head, keep: int) -> tuple[bytes, bool]:
    """The first ``keep`` bytes of the body, and whether the body was read to its end (so
    the connection can carry the next request)."""
    if head.framing == "none":
        return b"", True
    if head.framing == "chunked":
        return await _read_chunked(conn, keep)
    if head.framing == "close":  # the body runs until the server closes
        while len(conn.buffer) < keep and not conn.closed:
            try:
                await conn.more()
            except ConnectionError:
                break
        return bytes(conn.buffer[:keep]), False
    length = head.length
    whole = length <= DRAIN_BYTES
    want = length if whole else keep
    while len(conn.buffer) < want:
        await conn.more()
    body = bytes(conn.buffer[: min(keep, length)])
    if whole:
        del conn.buffer[:length]
    return body, whole


async def _read_chunked(conn: _Connection, keep: int) -> tuple[bytes, bool]:
    kept = bytearray()
    read = 0
    try:
        while True:
            line = await _line(conn, "chunk size")
            size_text = line.split(b";", 1)[0].strip(b" \t")
            if not _HEX.fullmatch(size_text):
                raise HttpError(f"bad chunk size in the answer: {size_text[:20]!r}")
            size = int(size_text, 16)
            if size == 0:
                while await _line(conn, "trailer"):  # trailers, then the blank line
                    pass
                return bytes(kept), True
            read += size
            if read > DRAIN_BYTES:  # too long to read through: its first bytes, and close
                want = min(size, max(0, keep - len(kept)))
                while len(conn.buffer) < want:
                    await conn.more()
                kept += conn.buffer[:want]
                return bytes(kept), False
            while len(conn.buffer) < size + 2:
                await conn.more()
            if conn.buffer[size : size + 2] != b"\r\n":
                raise HttpError("chunk data not followed by CRLF in the answer")
            if len(kept) < keep:
                kept += conn.buffer[: min(size, keep - len(kept))]
            del conn.buffer[: size + 2]
    except _Overrun:  # endless extensions or trailers: what came of the body, and close
        return bytes(kept), False


async def _line(conn: _Connection, what: str) -> bytes:
    end = conn.buffer.find(b"\r\n")
    while end < 0:
        if len(conn.buffer) > LINE_BYTES:
            raise HttpError(f"a {what} line in the answer is too long")
        await conn.more()
        end = conn.buffer.find(b"\r\n")
    if end > LINE_BYTES:
        raise HttpError(f"a {what} line in the answer is too long")
    line = bytes(conn.buffer[:end])
    del conn.buffer[: end + 2]
    return line


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]
