"""Starting the replication stream against a wal2json that does not know an option
ct1-cdc sends (an older build on the server): a one-line error naming the option and
the fix, not a retry forever as if the source were down."""

from __future__ import annotations

import pytest

from cdc.stream import ReplicationStream
from common.errors import SetupError, SourceUnavailable


def test_an_option_wal2json_does_not_know_is_a_setup_error(source_db):
    source_db.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", source_db.slot)
    stream = ReplicationStream(
        source_db.dsn, source_db.slot, {"format-version": "2", "include-future-thing": "1"}
    )
    with pytest.raises(SetupError) as refused:
        stream.start(0)
    message = str(refused.value)
    assert "include-future-thing" in message and "upgrade wal2json" in message
    assert not isinstance(refused.value, SourceUnavailable)
    stream.close()
