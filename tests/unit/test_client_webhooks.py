from __future__ import annotations

import json

import pytest

from client.webhooks import InvalidWebhook, WebhookVerifier
from dispatcher.signing import generate_secret, headers, secret_key

SECRET = generate_secret()
BODY = json.dumps({"id": 3, "type": "order.created"}).encode()
NOW = 1_800_000_000


def signed(secret: str = SECRET, body: bytes = BODY, at: int = NOW) -> dict[str, str]:
    return headers([secret_key(secret)], "evt_3", at, body, "1")


def test_valid_webhook_returns_the_envelope():
    assert WebhookVerifier(SECRET).verify(BODY, signed(), now=NOW + 10)["id"] == 3


@pytest.mark.parametrize(
    ("body", "hdrs", "message"),
    [
        (b'{"id": 4}', signed(), "no signature"),
        (BODY, signed(secret=generate_secret()), "no signature"),
        (BODY, signed(at=NOW - 3600), "too far"),
        (BODY, {k: v for k, v in signed().items() if k != "webhook-id"}, "missing"),
        (BODY, {**signed(), "webhook-timestamp": "soon"}, "not a number"),
    ],
)
def test_invalid_webhooks_are_refused(body, hdrs, message):
    with pytest.raises(InvalidWebhook, match=message):
        WebhookVerifier(SECRET).verify(body, hdrs, now=NOW)
