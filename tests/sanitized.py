"""One C file of the project built with AddressSanitizer and UndefinedBehaviorSanitizer
(and every gcc warning an error), then a script run against it in a fresh interpreter:
any out-of-bounds access, use after free or undefined behaviour aborts the run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _runtime(name: str) -> str | None:
    found = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return found if os.path.isabs(found) else None


def run_sanitized(
    sources: list[Path], package: Path, script: str, tmp_path: Path, env: dict[str, str] | None = None
) -> None:
    """Build each of ``sources`` as ``package/<its stem><suffix>`` and run ``script`` (its
    argv[1]: ``tmp_path``, which holds ``package``; ``env`` added to its environment) with
    the sanitizers preloaded; it must print "sanitized run ok".  Skipped without gcc or
    its sanitizer runtimes."""
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    asan, ubsan = _runtime("libasan.so"), _runtime("libubsan.so")
    if asan is None or ubsan is None:
        pytest.skip("gcc without the sanitizer runtimes")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for source in sources:
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
                str(source),
                "-o",
                str(package / f"{source.stem}{suffix}"),
            ],
            check=True,
        )
    environ = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "LD_PRELOAD": f"{asan}:{ubsan}",
        "PYTHONMALLOC": "malloc",  # every object from malloc, so ASan sees its bounds
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    }
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "sanitized run ok" in run.stdout
