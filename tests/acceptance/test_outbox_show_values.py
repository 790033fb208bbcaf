"""`ct1-cdc outbox show` prints a stored event exactly: an integer past 64 bits stays that
integer, and a value nested deeper than Python parses is shown as stored (issue 9)."""

from __future__ import annotations

import json
import sys

from common.jsontext import JsonText
from outbox import store
from outbox.store import Route, Router
from outbox.writer import OutboxWriter
from tests.acceptance.helpers import cli, write_config

BIG = 12345678901234567890123
DEEP = 3000


def test_outbox_show_keeps_every_value(tmp_path):
    outbox = tmp_path / "o.db"
    config = write_config(tmp_path / "c.toml", "host=127.0.0.1 port=1 dbname=none", "s", outbox)
    deep = "[" * DEEP + "1" + "]" * DEEP
    writer = OutboxWriter(store.open_outbox(outbox), Router([Route("ct2", ("*",))]))
    try:
        for data in (
            {"big": BIG, "doc": JsonText('{"n": -12345678901234567890123}')},
            {"doc": JsonText(deep)},
        ):
            writer.add(
                "thing.changed", "thing", 1, data, "2026-11-25T00:00:00.000000Z", None, "manual", None, None
            )
        writer.commit(None)
    finally:
        writer.close()

    shown = cli("outbox", "show", "1", "--json", config=config)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["event"]["data"] == {"big": BIG, "doc": {"n": -BIG}}
    human = cli("outbox", "show", "1", config=config)
    assert human.returncode == 0, human.stderr
    assert f'"big": {BIG}' in human.stdout and f'"n": -{BIG}' in human.stdout

    deep_json = cli("outbox", "show", "2", "--json", config=config)
    assert deep_json.returncode == 0, deep_json.stderr
    assert f'"data":{{"doc":{deep}}}' in deep_json.stdout
    deep_human = cli("outbox", "show", "2", config=config)
    assert deep_human.returncode == 0, deep_human.stderr
    assert deep in deep_human.stdout
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(4 * DEEP)
    try:
        assert json.loads(deep_json.stdout)["event"]["id"] == 2
    finally:
        sys.setrecursionlimit(limit)

    listed = cli("outbox", "list", config=config)  # the readable list parsed each event's data
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[2] for line in listed.stdout.splitlines()] == ["thing.changed"] * 2
