"""The compiled decoder built with AddressSanitizer and UndefinedBehaviorSanitizer (and
every gcc warning an error), then run on generated and damaged wal2json messages: any
out-of-bounds read, use after free or undefined behaviour in cdc/_wal2json.c aborts the
run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

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


def _runtime(name: str) -> str | None:
    found = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return found if os.path.isabs(found) else None


@pytest.mark.slow
def test_the_compiled_decoder_is_clean_under_sanitizers(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    asan, ubsan = _runtime("libasan.so"), _runtime("libubsan.so")
    if asan is None or ubsan is None:
        pytest.skip("gcc without the sanitizer runtimes")
    package = tmp_path / "cdc"
    package.mkdir()
    for source in (ROOT / "cdc").glob("*.py"):
        shutil.copy(source, package / source.name)
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
            str(ROOT / "cdc" / "_wal2json.c"),
            "-o",
            str(package / f"_wal2json{suffix}"),
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
