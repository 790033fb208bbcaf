"""The compiled decoder built with AddressSanitizer and UndefinedBehaviorSanitizer (and
every gcc warning an error), then run on generated and damaged wal2json messages: any
out-of-bounds read, use after free or undefined behaviour in cdc/_wal2json.c aborts the
run."""

from __future__ import annotations

import shutil

import pytest

from tests.sanitized import ROOT, run_sanitized

SCRIPT = """
import sys
from hypothesis import settings
import cdc.decode as decoding
assert decoding.COMPILED and decoding._compiled.__file__.startswith(sys.argv[1]), decoding._compiled.__file__
import tests.unit.test_decode_compiled as contract
for name in ("test_compiled_and_python_decoders_agree_on_row_messages",
             "test_damaged_messages_give_the_same_result_or_the_same_error"):
    test = getattr(contract, name)
    test._hypothesis_internal_use_settings = settings(max_examples=600, deadline=None, database=None)
    test()
print("sanitized run ok")
"""


@pytest.mark.slow
def test_the_compiled_decoder_is_clean_under_sanitizers(tmp_path):
    package = tmp_path / "cdc"
    package.mkdir()
    for source in (ROOT / "cdc").glob("*.py"):
        shutil.copy(source, package / source.name)
    run_sanitized(ROOT / "cdc" / "_wal2json.c", package, "_wal2json", SCRIPT, tmp_path)
