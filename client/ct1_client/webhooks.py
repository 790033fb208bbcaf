"""Verifying ct1-cdc webhooks on the receiving side (CT2, CT3).

    verifier = WebhookVerifier("whsec_...")
    envelope = verifier.verify(body_bytes, request_headers)   # raises InvalidWebhook

Equivalent to the official ``standardwebhooks`` package: the signature covers
``"<webhook-id>.<webhook-timestamp>.<body>"``, and timestamps further than
``tolerance`` seconds from now are refused, so a captured request cannot be replayed
later.  Deduplicate on ``webhook-id``: a delivery may arrive more than once.

This package stands alone (``pip install ./client``): it imports nothing of the sidecar.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

PREFIX = "whsec_"


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (the prefix is optional, as in the spec)."""
    text = secret[len(PREFIX) :] if secret.startswith(PREFIX) else secret
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError("a webhook secret is whsec_<base64>") from None


def verify(key: bytes, msg_id: str, timestamp: int, body: bytes, signature_header: str) -> bool:
    """Whether any ``v1,<base64>`` signature in the header (space-separated: two while the
    sender rotates its secret) is the HMAC-SHA256 of ``"id.timestamp.body"`` (constant time)."""
    mac = hmac.digest(key, b"%s.%d.%s" % (msg_id.encode(), timestamp, body), hashlib.sha256)
    expected = "v1," + base64.b64encode(mac).decode("ascii")
    return any(hmac.compare_digest(expected, candidate) for candidate in signature_header.split(" "))


class InvalidWebhook(Exception):
    """The request is not a valid ct1-cdc webhook (bad signature, headers or time)."""


class WebhookVerifier:
    def __init__(self, secret: str, tolerance: float = 300.0) -> None:
        self.key = secret_key(secret)
        self.tolerance = tolerance

    def verify(self, body: bytes, headers: Mapping[str, str], now: float | None = None) -> dict[str, Any]:
        lower = {k.lower(): v for k, v in headers.items()}
        msg_id = lower.get("webhook-id")
        stamp = lower.get("webhook-timestamp")
        signature = lower.get("webhook-signature")
        if not (msg_id and stamp and signature):
            raise InvalidWebhook("missing webhook-id, webhook-timestamp or webhook-signature")
        try:
            timestamp = int(stamp)
        except ValueError:
            raise InvalidWebhook("webhook-timestamp is not a number") from None
        current = time.time() if now is None else now
        if abs(current - timestamp) > self.tolerance:
            raise InvalidWebhook("webhook-timestamp is too far from now")
        if not verify(self.key, msg_id, timestamp, body, signature):
            raise InvalidWebhook("no signature matches")
        envelope: dict[str, Any] = json.loads(body)
        return envelope
