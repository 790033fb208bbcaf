"""Our signatures verify with the official standardwebhooks package, during rotations too."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from common.errors import ConfigError
from dispatcher.signing import generate_secret, headers, message_id, secret_key, sign, verify


def _now() -> int:
    return int(datetime.now(tz=UTC).timestamp())


def test_headers_verify_with_the_official_package():
    secret = generate_secret()
    body = json.dumps({"id": 7, "type": "order.created", "data": {"total": "9.99", "name": "Zoë"}}).encode()
    h = headers([secret_key(secret)], message_id(7), _now(), body, "0.1.0")
    assert h["webhook-id"] == "evt_7"
    assert h["content-type"] == "application/json"
    assert h["user-agent"] == "ct1-cdc/0.1.0"
    assert h["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(body, h) == json.loads(body)


def test_rotation_signs_with_both_secrets_and_either_verifies():
    new, old = generate_secret(), generate_secret()
    body = b'{"id":1}'
    h = headers([secret_key(new), secret_key(old)], "evt_1", _now(), body, "0.1.0")
    assert len(h["webhook-signature"].split(" ")) == 2
    Webhook(new).verify(body, h)
    Webhook(old).verify(body, h)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(body, h)


def test_tampered_body_or_id_fails():
    secret = generate_secret()
    h = headers([secret_key(secret)], "evt_1", _now(), b'{"a":1}', "0.1.0")
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(b'{"a":2}', h)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(b'{"a":1}', {**h, "webhook-id": "evt_2"})


@given(
    st.binary(min_size=16, max_size=64),
    st.integers(min_value=1, max_value=2**40),
    st.integers(min_value=0, max_value=2**34),
    st.binary(max_size=300),
)
def test_property_sign_then_verify(key, event_id, timestamp, body):
    sig = sign(key, message_id(event_id), timestamp, body)
    assert verify(key, message_id(event_id), timestamp, body, sig)
    assert not verify(key, message_id(event_id + 1), timestamp, body, sig)


@pytest.mark.parametrize("bad", ["whsec_not base64!", "whsec_c2hvcnQ=", ""])
def test_bad_secrets_are_refused(bad):
    with pytest.raises(ConfigError):
        secret_key(bad)


def test_generated_secrets_are_distinct_and_well_formed():
    a, b = generate_secret(), generate_secret()
    assert a != b and a.startswith("whsec_") and len(secret_key(a)) == 32
