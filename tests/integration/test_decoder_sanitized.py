"""The compiled decoder and the frame reader built with AddressSanitizer and
UndefinedBehaviorSanitizer (and every gcc warning an error), then run on generated and
damaged wal2json messages, on frames of every shape from a libpq of the tests' own, and on
a real replication stream (the frame reader's tests):
any out-of-bounds read, use after free or undefined behaviour in cdc/_wal2json.c or
cdc/_frames.c aborts the run."""

from __future__ import annotations

import shutil

import pytest

from tests.sanitized import ROOT, run_sanitized

SCRIPT = """
import sys
from pathlib import Path
import pytest
import tests
import cdc.decode as decoding
from cdc import _frames
assert decoding.COMPILED and decoding._compiled.__file__.startswith(sys.argv[1]), decoding._compiled.__file__
assert _frames.__file__.startswith(sys.argv[1]), _frames.__file__
# the frame reader's tests first: pytest then imports hypothesis itself, as it must
reader_tests = [Path(tests.__file__).parent / "integration" / "test_native_read.py",
                Path(tests.__file__).parent / "unit" / "test_frames_reader.py"]
class Passed:
    count = 0
    def pytest_runtest_logreport(self, report):
        Passed.count += report.when == "call" and report.passed
code = pytest.main(["-q", "-p", "no:randomly", "-p", "no:xdist", "--rootdir", str(reader_tests[0].parents[2]),
                    *map(str, reader_tests)], plugins=[Passed()])
assert code == 0 and Passed.count == 6, (code, Passed.count)  # (none skipped)
from hypothesis import settings
import tests.unit.test_decode_compiled as contract
for name in ("test_compiled_and_python_decoders_agree_on_row_messages",
             "test_compiled_and_python_decoders_agree_on_begins_and_commits",
             "test_damaged_messages_give_the_same_result_or_the_same_error"):
    test = getattr(contract, name)
    test._hypothesis_internal_use_settings = settings(max_examples=600, deadline=None, database=None)
    test()
print("sanitized run ok")
"""


@pytest.mark.slow
def test_the_compiled_decoder_and_frame_reader_are_clean_under_sanitizers(tmp_path, pg_server):
    package = tmp_path / "cdc"
    package.mkdir()
    for source in (ROOT / "cdc").glob("*.py"):
        shutil.copy(source, package / source.name)
    sources = [ROOT / "cdc" / "_wal2json.c", ROOT / "cdc" / "_frames.c"]
    # (the reader's tests use this suite's server: a Postgres started under the sanitizers' preload would not do)
    run_sanitized(sources, package, SCRIPT, tmp_path, env={"CT1_TEST_DSN": pg_server})
