"""Running the CLI as a subprocess, the way a user or a supervisor does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from standardwebhooks import Webhook

from ct1_client.receiver import Receiver, ThreadedReceiver
from tests.catalogue_check import SchemaWatch

CLI = str(Path(sys.executable).parent / "ct1-cdc")


def write_config(
    path: Path, dsn: str, slot: str, outbox: Path, *, mapping: str | None = None, **extra: Any
) -> Path:
    """A config file; ``mapping``, the text of a mapping file written beside it (default:
    the marketplace's)."""
    from tests.conftest import MAPPING

    mapping_file = MAPPING
    if mapping is not None:
        mapping_file = path.with_name(path.stem + ".mapping.toml")
        mapping_file.write_text(mapping)

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
        f"file = {str(mapping_file)!r}",
    ]
    for key, value in extra.items():
        lines.append(f"{key} = {value!r}")
    path.write_text("\n".join(lines) + "\n")
    return path


def env_for(config: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CT1_")}
    # marketplace.analytics appends an event of its own when a run starts: off unless a
    # test asks for it (CT1_ANALYTICS__ENABLED="true"), so outboxes hold what tests wrote
    env["CT1_ANALYTICS__ENABLED"] = "false"
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


def _signals_as_a_terminal_gives_them() -> None:
    # A suite started in the background by a shell (`... &`, nohup) ignores SIGINT and
    # SIGQUIT, and a child inherits that: the tests that press Ctrl-C would wait forever.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def spawn(*args: str, log: Path, config: Path | None = None, **env: str) -> subprocess.Popen[bytes]:
    """Start the CLI in the background; its stderr (the logs) is appended to ``log``."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [CLI, *args],
            stdout=subprocess.DEVNULL,
            stderr=fh,
            env=env_for(config, **env),
            stdin=subprocess.DEVNULL,
            preexec_fn=_signals_as_a_terminal_gives_them,
        )


class ThreadReceiver:
    """A webhook receiver on loopback, served from a thread, for subprocess tests.

    It verifies every request with the official standardwebhooks package (once
    ``secret`` is set) and records the verified envelopes and their webhook-id headers.
    Each verified envelope is checked against its schema (config/schemas): a misfit fails
    the test when the receiver closes.
    """

    def __init__(self) -> None:
        self.secret: str | None = None
        self.schemas = SchemaWatch()
        self.receiver = Receiver(self._verify)
        self._served = ThreadedReceiver(self.receiver)

    def _verify(self, body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
        assert self.secret is not None, "no secret yet"
        envelope: dict[str, Any] = Webhook(self.secret).verify(body, dict(headers))
        self.schemas.check(envelope)
        return envelope

    @property
    def url(self) -> str:
        return self.receiver.url

    @property
    def received(self) -> list[dict[str, Any]]:
        return [r.envelope for r in self.receiver.received]

    @property
    def ids(self) -> list[str]:
        return [r.webhook_id for r in self.receiver.received]

    @property
    def rejected(self) -> int:
        return self.receiver.rejected

    def forget(self) -> None:
        self.receiver.forget()

    def __enter__(self) -> ThreadReceiver:
        self._served.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._served.__exit__(*exc)
        if exc[0] is None:
            self.schemas.assert_clean()
