"""Standard Webhooks signing (pure: no I/O).

``webhook-signature`` is ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` under the
secret's key (``whsec_<base64 key>``); while a previous secret is set, a second signature
follows, space-separated, so receivers verify with either during a rotation.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from collections.abc import Sequence

from common.formats import WHSEC_PREFIX as PREFIX
from common.formats import secret_key as secret_key  # (where the dispatcher has always found it)

USER_AGENT_PRODUCT = "ct1-cdc"


def generate_secret(nbytes: int = 32) -> str:
    """A new random signing secret, shown as ``whsec_<base64>``."""
    return PREFIX + base64.b64encode(secrets.token_bytes(nbytes)).decode("ascii")


def message_id(event_id: int) -> str:
    return f"evt_{event_id}"


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature."""
    mac = hmac.digest(key, b"%s.%d.%s" % (msg_id.encode(), timestamp, body), "sha256")
    return "v1," + base64.b64encode(mac).decode("ascii")


def headers(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes, version: str) -> dict[str, str]:
    """Every header of one delivery: the signatures under each key (current first)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": (
            sign(keys[0], msg_id, timestamp, body)
            if len(keys) == 1
            else " ".join([sign(k, msg_id, timestamp, body) for k in keys])
        ),
        "content-type": "application/json",
        "user-agent": f"{USER_AGENT_PRODUCT}/{version}",
    }


def verify(key: bytes, msg_id: str, timestamp: int, body: bytes, signature_header: str) -> bool:
    """Whether any ``v1`` signature in the header matches (constant-time compare)."""
    expected = sign(key, msg_id, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in signature_header.split(" "))
