"""A manual event (POST /webhooks/send) keeps every value exactly, in the events API and in
the webhook; what cannot be taken is a clear 4xx (issue 9)."""

from __future__ import annotations

import json

from api.app import BASE
from dispatcher.worker import Dispatcher
from tests.integration.test_api_webhooks import client_for, settings_for
from tests.integration.test_dispatch import Receiver, run_until

BIG = 12345678901234567890123


def _nested(levels: int) -> str:
    return "[" * levels + str(BIG) + "]" * levels


async def test_an_integer_past_64_bits_is_sent_as_it_was_given(tmp_path):
    # issue 9: the integer came back as a float, 1.2345678901234568e+22
    async with Receiver() as ct2, Receiver() as ct3:
        settings = settings_for(tmp_path, ct2.url, ct3.url)
        client, auth = await client_for(settings)
        try:
            # 300 levels: past what orjson writes (254), well within what the API takes
            data = f'{{"big": {BIG}, "small": -{2**70}, "price": 0.1, "deep": {_nested(300)}}}'
            body = '{"event": "seller.note_added", "systems": ["ct2"], "data": ' + data + "}"
            resp = await client.post(
                f"{BASE}/webhooks/send", data=body, headers={"X-API-Key": auth["X-API-Key"]}
            )
            assert resp.status == 201, await resp.text()
            want = {"big": BIG, "small": -(2**70), "price": 0.1, "deep": json.loads(_nested(300))}

            resp = await client.get(f"{BASE}/events", headers={"X-API-Key": auth["export"]})
            text = await resp.text()
            assert resp.status == 200 and f'"big":{BIG}' in text
            (event,) = json.loads(text)["data"]
            assert event["source"]["op"] == "manual" and event["data"] == want

            await run_until(Dispatcher(settings), lambda: len(ct2.received) == 1)
            assert ct2.received[0].envelope["data"] == want  # parsed by standardwebhooks
        finally:
            await client.close()


async def test_bodies_that_cannot_be_taken_are_a_clear_4xx(tmp_path):
    client, auth = await client_for(settings_for(tmp_path, "http://127.0.0.1:1/a", "http://127.0.0.1:1/b"))
    api_key = {"X-API-Key": auth["X-API-Key"]}
    try:
        cases = [
            ('{"event": "note.added", "data": {"deep": ' + _nested(5000) + "}}", "nested too deeply"),
            ('{"event": "note.added", "data": {"x": NaN}}', "not valid JSON"),
            ('{"event": "note.added", "data": {"x": 1e400}}', "not valid JSON"),
            (b'{"event": "note.added", "data": {"x": "\xff"}}', "not valid JSON"),
        ]
        for payload, message in cases:
            resp = await client.post(f"{BASE}/webhooks/send", data=payload, headers=api_key)
            body = await resp.json()
            assert resp.status == 400 and body["success"] is False, (payload[:60], body)
            assert body["error"]["code"] == "bad_json" and message in body["error"]["message"]
    finally:
        await client.close()
