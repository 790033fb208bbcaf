from __future__ import annotations

import json

import pytest

from ct1_client.webhooks import InvalidWebhook, WebhookVerifier
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


def test_a_rotated_secret_signs_twice_and_either_key_verifies():
    old, new = generate_secret(), generate_secret()
    both = headers([secret_key(new), secret_key(old)], "evt_3", NOW, BODY, "1")
    assert " " in both["webhook-signature"]
    for secret in (old, new):
        assert WebhookVerifier(secret).verify(BODY, both, now=NOW)["id"] == 3


def test_signatures_of_the_official_standardwebhooks_package_verify():
    from datetime import UTC, datetime

    from standardwebhooks import Webhook

    signature = Webhook(SECRET).sign("msg_1", datetime.fromtimestamp(NOW, tz=UTC), BODY.decode())
    hdrs = {"webhook-id": "msg_1", "webhook-timestamp": str(NOW), "webhook-signature": signature}
    assert WebhookVerifier(SECRET).verify(BODY, hdrs, now=NOW)["type"] == "order.created"


def test_accept_says_what_to_do_with_a_request_without_a_web_framework():
    from ct1_client.kit import accept

    class Seen:
        def __init__(self) -> None:
            self.ids: set[str] = set()

        def seen(self, webhook_id: str) -> bool:
            return webhook_id in self.ids

        def mark(self, webhook_id: str) -> None:
            self.ids.add(webhook_id)

    seen = Seen()
    verifiers = [WebhookVerifier(generate_secret()), WebhookVerifier(SECRET)]  # a rotation: either key
    hdrs = signed(at=int(__import__("time").time()))
    first = accept(verifiers, seen, BODY, hdrs)
    assert (first.status, first.envelope) == (200, json.loads(BODY))
    seen.mark("evt_3")
    again = accept(verifiers, seen, BODY, hdrs)
    assert (again.status, again.text, again.envelope) == (200, "duplicate", None)
    refused = accept(verifiers[:1], seen, BODY, hdrs)
    assert refused.status == 401 and "no signature matches" in refused.text
