"""How positions and times are written, the same everywhere (pure).

LSNs as Postgres prints them (``16/B374D848``); times as ISO 8601 UTC text: with
microseconds in events and API answers, to the second in the CLI's tables.
"""

from __future__ import annotations

import base64
import re
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from common.errors import ConfigError, DecodeError

EVENT_TYPE = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$"  # dotted lower-case names: order.created
is_event_type = re.compile(EVENT_TYPE).fullmatch
WHSEC_PREFIX = "whsec_"  # a Standard Webhooks signing secret: whsec_<base64 key>


def parse_lsn(text: str) -> int:
    """``"16/B374D848"`` → integer position."""
    try:
        hi, lo = text.split("/")
        return (int(hi, 16) << 32) | int(lo, 16)
    except (ValueError, AttributeError):
        raise DecodeError(f"not an LSN: {text!r}") from None


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def unix_to_iso(seconds: float) -> str:
    """Unix time as the ISO 8601 UTC text events use (``2026-11-25T14:00:00.123456Z``)."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def optional_iso(seconds: float | None) -> str | None:
    return None if seconds is None else unix_to_iso(seconds)


def unix_to_text(seconds: float | None) -> str | None:
    """Unix time to the second, as the CLI shows it (``2026-11-25T14:00:00Z``)."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def normalize(value: Any) -> Any:
    """A value read with psycopg, in the form capture's decoder gives the same column."""
    if value is None or isinstance(value, (bool, int, float, str, dict, list)):
        return value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.isoformat(sep=" ")
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` signing secret (the prefix is optional, as in the
    Standard Webhooks spec).  The error never shows the secret."""
    text = secret[len(WHSEC_PREFIX) :] if secret.startswith(WHSEC_PREFIX) else secret
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        raise ConfigError("webhook secret is not whsec_<base64>") from None
    if len(key) < 16:
        raise ConfigError("webhook secret is too short: use at least 16 random bytes")
    return key
