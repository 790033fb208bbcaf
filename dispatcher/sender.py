"""The HTTP side of a delivery: one signed POST, never following redirects, reading at
most the first KiB of the answer.  Every failure becomes an :class:`Attempt`; nothing
raises."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from common.errors import ConfigError
from dispatcher.http1 import Client, HttpError

RESPONSE_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Attempt:
    status: int  # 0: no HTTP answer (timeout, refused, reset)
    duration_ms: float
    error: str | None
    response: str | None
    retry_after: str | None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(name: str, url: str, require_https: bool, refuse_private: bool = False) -> None:
    """Refuse an endpoint URL that is not http(s), plain http off loopback when HTTPS is
    required, or a private address literal when private networks are refused (host
    names are checked when they resolve, by :class:`~dispatcher.http1.Client`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"endpoint {name}: url {url!r} is not an http(s) URL")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise ConfigError(f"endpoint {name}: url {url!r} holds a space or a control character")
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number or out of range)
    except ValueError:
        raise ConfigError(f"endpoint {name}: url {url!r} has a bad port") from None
    if parts.scheme == "http" and require_https and not is_loopback(parts.hostname):
        raise ConfigError(f"endpoint {name}: url must use https (or set dispatcher.require_https = false)")
    if refuse_private:
        try:
            address = ipaddress.ip_address(parts.hostname)
        except ValueError:
            return
        if not (address.is_loopback or address.is_global):
            raise ConfigError(
                f"endpoint {name}: {address} is a private address and dispatcher.refuse_private_networks is set"
            )


class Sender:
    """Every delivery's POST, through one :class:`~dispatcher.http1.Client`: connections
    are kept alive and reused per endpoint."""

    def __init__(self, timeout: float, *, concurrency: int, refuse_private: bool = False) -> None:
        self.timeout = timeout
        self.client = Client(refuse_private=refuse_private, max_idle=max(concurrency, 1))

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Attempt:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                answer = await self.client.post(url, body, headers, keep=RESPONSE_BYTES)
        except TimeoutError:
            return Attempt(0, _ms(started), "timeout", None, None)
        except HttpError as exc:
            return Attempt(0, _ms(started), str(exc)[:500], None, None)
        status = answer.status
        return Attempt(
            status=status,
            duration_ms=_ms(started),
            error=None if 200 <= status <= 299 else f"HTTP {status}",
            response=answer.body.decode("utf-8", "replace"),
            retry_after=answer.headers.get("retry-after"),
        )

    async def close(self) -> None:
        await self.client.close()


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
