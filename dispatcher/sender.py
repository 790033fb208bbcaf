"""The HTTP side of a delivery: one signed POST, never following redirects, reading at
most the first KiB of the answer.  Every failure becomes an :class:`Attempt`; nothing
raises."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from common.errors import ConfigError

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
    names are checked when they resolve, by :class:`PublicOnlyResolver`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"endpoint {name}: url {url!r} is not an http(s) URL")
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


class PublicOnlyResolver(aiohttp.abc.AbstractResolver):
    """Resolves like the default resolver but refuses private, link-local and reserved
    addresses (loopback stays allowed for local receivers)."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = []
        for result in results:
            address = ipaddress.ip_address(result["host"])
            if address.is_loopback or address.is_global:
                allowed.append(result)
        if not allowed:
            raise OSError(f"{host} resolves only to private addresses, which are refused")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class Sender:
    """One aiohttp session for all deliveries: connections are reused per endpoint."""

    def __init__(self, timeout: float, *, concurrency: int, refuse_private: bool = False) -> None:
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        resolver = PublicOnlyResolver() if refuse_private else None
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency, resolver=resolver),
            timeout=self.timeout,
            auto_decompress=False,
        )

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Attempt:
        started = time.perf_counter()
        try:
            async with self.session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                snippet = await resp.content.read(RESPONSE_BYTES)
                return Attempt(
                    status=resp.status,
                    duration_ms=_ms(started),
                    error=None if 200 <= resp.status <= 299 else f"HTTP {resp.status}",
                    response=snippet.decode("utf-8", "replace"),
                    retry_after=resp.headers.get("Retry-After"),
                )
        except TimeoutError:
            return Attempt(0, _ms(started), "timeout", None, None)
        except (aiohttp.ClientError, OSError) as exc:
            return Attempt(0, _ms(started), f"{type(exc).__name__}: {exc}"[:500], None, None)
        except asyncio.CancelledError:
            raise

    async def close(self) -> None:
        await self.session.close()


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
