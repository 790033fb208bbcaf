"""wal2json leaves a quoted type name unescaped ("type":"Sales Ops".stage): the message is
not valid JSON.  Both decoders still read it, naming the type as format_type() does."""

from __future__ import annotations

import pytest

from cdc.decode import RowChange, decode, decode_python, repair_type_names

# real wal2json 2.5 output (format-version 2, include-types) for a table in schema "Sales Ops"
REAL = (
    b'{"action":"I","xid":727,"lsn":"0/19E4F08","schema":"Sales Ops","table":"tt","columns":['
    b'{"name":"id","type":"integer","value":1},'
    b'{"name":"a","type":"Sales Ops"."Stage Kind","value":"a"},'
    b'{"name":"b","type":"Mood","value":"ok"},'
    b'{"name":"c","type":"\\"Sales Ops\\".stage[]","value":"{won}"},'
    b'{"name":"s","type":"Sales Ops".stage,"value":"won"},'
    b'{"name":"n","type":"numeric(10,2)","value":1.50},'
    b'{"name":"q","type":"my""odd".t(3)[],"value":"{x}"}'
    b'],"pk":[{"name":"id","type":"integer"}]}'
)


@pytest.mark.parametrize("decoder", [decode, decode_python])
def test_a_message_with_raw_type_names_decodes(decoder):
    row = decoder(REAL)
    assert isinstance(row, RowChange)
    assert row.table == "Sales Ops.tt" and row.pk == ("id",)
    assert row.new == {"id": 1, "a": "a", "b": "ok", "c": "{won}", "s": "won", "n": "1.50", "q": "{x}"}


def test_only_raw_names_are_rewritten():
    repaired = repair_type_names(REAL)
    assert repaired is not None
    assert b'"type":"\\"Sales Ops\\".\\"Stage Kind\\""' in repaired
    assert b'"type":"\\"Sales Ops\\".stage"' in repaired
    assert b'"type":"\\"my\\"\\"odd\\".t(3)[]"' in repaired
    assert b'"type":"integer"' in repaired and b'"type":"Mood"' in repaired
    valid = b'{"action":"I","columns":[{"name":"a.b","type":"text","value":"\\"x\\".y"}]}'
    assert repair_type_names(valid) is None


def test_a_message_broken_otherwise_still_fails_with_a_clear_error():
    from common.errors import DecodeError

    with pytest.raises(DecodeError, match="malformed wal2json message"):
        decode_python(b'{"action":"I","schema":"s","table":"t","columns":[{"name":"a","type":"x" y}]}')
