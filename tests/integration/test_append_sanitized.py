"""The native appender built with AddressSanitizer and UndefinedBehaviorSanitizer (and every
gcc warning an error), then run through its own tests and the sink contract on its thread:
any out-of-bounds access, use after free or undefined behaviour in outbox/_append.c (the
chunk copies, the queue, the thread's binds) aborts the run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.integration.test_decoder_sanitized import _runtime

ROOT = Path(__file__).resolve().parents[2]

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
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    asan, ubsan = _runtime("libasan.so"), _runtime("libubsan.so")
    if asan is None or ubsan is None:
        pytest.skip("gcc without the sanitizer runtimes")
    package = tmp_path / "outbox"
    shutil.copytree(ROOT / "outbox", package, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    subprocess.run(
        [
            "gcc",
            "-O1",
            "-g",
            "-fsanitize=address,undefined",
            "-fno-omit-frame-pointer",
            "-fno-sanitize-recover=all",
            "-Wall",
            "-Wextra",
            "-Werror",  # a warning in the C file fails the suite too
            "-fPIC",
            "-shared",
            f"-I{sysconfig.get_paths()['include']}",
            str(ROOT / "outbox" / "_append.c"),
            "-o",
            str(package / f"_append{suffix}"),
        ],
        check=True,
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "LD_PRELOAD": f"{asan}:{ubsan}",
        "PYTHONMALLOC": "malloc",  # every object from malloc, so ASan sees its bounds
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    }
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "sanitized run ok" in run.stdout
