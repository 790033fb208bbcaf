"""The HTTP side of a delivery: one signed POST, never following redirects, reading at
most the first KiB of the answer.  Every failure becomes an :class:`Attempt`; nothing
raises."""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from common.errors import ConfigError
from dispatcher.http1 import Client, HttpError, Target, allowed_address

RESPONSE_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Attempt:
    status: int  # 0: no HTTP answer (timeout, refused, reset)
    duration_ms: float
    error: str | None
    response: str | None
    retry_after: str | None


def check_url(name: str, url: str, require_https: bool, refuse_private: bool = False) -> None:
    """Refuse an endpoint URL that cannot be a request (not http(s), credentials in it, a
    space, a bad port or host name), plain http off loopback when HTTPS is required, or a
    private address literal when private networks are refused (host names are checked
    when they resolve, by :class:`~dispatcher.http1.Client`).  Messages show the URL
    without credentials or query."""
    try:
        target = Target.parse(url)
    except HttpError as exc:
        raise ConfigError(f"endpoint {name}: url {exc}") from None
    if not target.tls and require_https and not target.loopback:
        raise ConfigError(f"endpoint {name}: url must use https (or set dispatcher.require_https = false)")
    if refuse_private:
        try:
            ipaddress.ip_address(target.host)
        except ValueError:
            return
        if not allowed_address(target.host, loopback=True):
            raise ConfigError(
                f"endpoint {name}: {target.host} is a private address and "
                "dispatcher.refuse_private_networks is set"
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
            answer = await self.client.post(url, body, headers, keep=RESPONSE_BYTES, timeout=self.timeout)
        except TimeoutError:
            return Attempt(0, _ms(started), "timeout", None, None)
        except HttpError as exc:
            return Attempt(0, _ms(started), str(exc)[:500], None, None)
        except Exception as exc:  # a bug here must not stop deliveries: a failed attempt
            return Attempt(0, _ms(started), f"internal error: {type(exc).__name__}: {exc}"[:500], None, None)
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
