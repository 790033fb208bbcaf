"""Running the CLI as a subprocess, the way a user or a supervisor does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

CLI = str(Path(sys.executable).parent / "ct1-cdc")


def write_config(path: Path, dsn: str, slot: str, outbox: Path, **extra: Any) -> Path:
    from tests.conftest import MAPPING

    lines = [
        "[source]",
        f"dsn = {dsn!r}",
        f"slot = {slot!r}",
        "heartbeat_seconds = 0.2",
        "status_interval_seconds = 1",
        "reconnect_max_seconds = 1",
        "[outbox]",
        f"path = {str(outbox)!r}",
        "[mapping]",
        f"file = {str(MAPPING)!r}",
    ]
    for key, value in extra.items():
        lines.append(f"{key} = {value!r}")
    path.write_text("\n".join(lines) + "\n")
    return path


def env_for(config: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CT1_")}
    if config is not None:
        env["CT1_CONFIG"] = str(config)
    env.update(extra)
    return env


def cli(
    *args: str, config: Path | None = None, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_for(config, **env),
        stdin=subprocess.DEVNULL,
    )


def spawn(*args: str, log: Path, config: Path | None = None, **env: str) -> subprocess.Popen[bytes]:
    """Start the CLI in the background; its stderr (the logs) is appended to ``log``."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [CLI, *args],
            stdout=subprocess.DEVNULL,
            stderr=fh,
            env=env_for(config, **env),
            stdin=subprocess.DEVNULL,
        )
