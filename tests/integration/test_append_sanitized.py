"""The native appender built with AddressSanitizer and UndefinedBehaviorSanitizer (and every
gcc warning an error), then run through its own tests and the sink contract on its thread:
any out-of-bounds access, use after free or undefined behaviour in outbox/_append.c (the
chunk copies, the queue, the thread's binds) aborts the run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.sanitized import ROOT, run_sanitized

SCRIPT = """
import sys, tempfile
from pathlib import Path
from outbox import _append
assert _append.__file__.startswith(sys.argv[1]), _append.__file__
import tests.integration.test_append_thread as own
import tests.integration.test_sink_outbox as contract
for name in [n for n in dir(own) if n.startswith("test_") and "in_memory" not in n]:
    getattr(own, name)(Path(tempfile.mkdtemp()))  # (each takes a directory alone)
suite = contract.TestOutboxWriter()
for name in [n for n in dir(suite) if n.startswith("test_")]:
    getattr(suite, name)(contract.OutboxBackend(Path(tempfile.mkdtemp()) / "outbox.db", True))
print("sanitized run ok")
"""


@pytest.mark.slow
def test_the_native_appender_is_clean_under_sanitizers(tmp_path: Path) -> None:
    package = tmp_path / "outbox"
    shutil.copytree(ROOT / "outbox", package, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    run_sanitized([ROOT / "outbox" / "_append.c"], package, SCRIPT, tmp_path)
