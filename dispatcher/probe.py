"""A signed ``webhook.test`` message sent to one endpoint now, outside the outbox: used by
``POST /webhooks/test`` and by ``ct1-cdc setup`` to probe the receivers."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import orjson

from common.formats import unix_to_iso
from config.settings import EndpointSettings
from dispatcher import signing
from dispatcher.sender import Sender


@dataclass(frozen=True, slots=True)
class Probe:
    system: str
    webhook_id: str
    delivered: bool
    status: int  # 0: no HTTP answer
    latency_ms: float
    error: str | None

    def as_dict(self) -> dict[str, object]:
        return {
            "system": self.system,
            "webhook_id": self.webhook_id,
            "delivered": self.delivered,
            "status": self.status,
            "latency_ms": self.latency_ms,
            "error": self.error,
        }


async def send_test(sender: Sender, endpoint: EndpointSettings, secret: str, version: str) -> Probe:
    """Sign a ``webhook.test`` with the endpoint's secret (and its previous one while it is
    rotated) and post it; the receiver's answer, or why there was none."""
    keys = [signing.secret_key(secret)]
    if endpoint.previous_secret:
        keys.append(signing.secret_key(endpoint.previous_secret))
    now = time.time()
    msg_id = f"evt_test_{secrets.token_hex(8)}"
    payload = orjson.dumps(
        {
            "id": None,
            "type": "webhook.test",
            "timestamp": unix_to_iso(now),
            "data": {"object": "webhook_test", "system": endpoint.name, "message": "ct1-cdc test delivery"},
            "source": None,
        }
    )
    attempt = await sender.post(
        endpoint.url, payload, signing.headers(keys, msg_id, int(now), payload, version)
    )
    return Probe(
        endpoint.name,
        msg_id,
        200 <= attempt.status <= 299,
        attempt.status,
        attempt.duration_ms,
        attempt.error,
    )
