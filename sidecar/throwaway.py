"""A throwaway Postgres cluster with logical decoding, for the demo, tests and benchmarks.

initdb refuses to run as root, so when we are root every server command runs as the
``postgres`` OS user, in a directory that user owns.  The cluster listens on loopback
only, on a free port, with trust authentication, and is removed by :meth:`stop`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import SetupError


def find_pg_bin() -> Path:
    """The newest installed Postgres server binaries (Debian layout first, then PATH)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    if candidates:
        return Path(candidates[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise SetupError("no Postgres server binaries found: install postgresql (apt-get install postgresql)")


def _has_plugin_allowlist(pg_bin: Path) -> bool:
    """Some Postgres builds load only the output plugins named in output_plugin_libraries."""
    try:
        return b"output_plugin_libraries" in (pg_bin / "postgres").read_bytes()
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A running throwaway cluster.  ``dsn`` connects as the superuser ``postgres``."""

    datadir: Path
    port: int
    bin: Path
    root: Path
    run_as: str | None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root / "postgres.log"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def recvlogical(
        self,
        dbname: str,
        slot: str,
        options: dict[str, str],
        *,
        output: str = "/dev/null",
        endpos: str | None = None,
        fsync_interval: int = 10,
    ) -> list[str]:
        """A ``pg_recvlogical --start`` command for ``slot`` (the benchmarks' baseline)."""
        cmd = [
            str(self.bin / "pg_recvlogical"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            dbname,
            "--slot",
            slot,
            "--start",
            "-f",
            output,
            "--fsync-interval",
            str(fsync_interval),
            "--status-interval",
            "10",
            "--no-loop",
        ]
        if endpos is not None:
            cmd += ["--endpos", endpos]
        for key, value in options.items():
            cmd += ["-o", f"{key}={value}"]
        return cmd

    def sample_database(self, dbname: str, volume: Any = None, seed: int = 1) -> tuple[str, dict[str, int]]:
        """Create ``dbname`` holding the sample marketplace; its DSN and the row counts."""
        import psycopg

        from sidecar import sample

        with psycopg.connect(self.dsn(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{dbname}"')
        dsn = self.dsn(dbname)
        with psycopg.connect(dsn, autocommit=True) as conn:
            sample.create_schema(conn)
            counts = sample.generate(conn, seed=seed, volume=volume)
        return dsn, counts

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        try:
            return subprocess.run(cmd, check=check, capture_output=True, text=True, user=self.run_as, cwd="/")
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or exc.stdout or "").strip().splitlines()
            raise SetupError(
                f"{args[0]} failed: {detail[-1] if detail else exc.returncode} (log: {self.log})"
            ) from exc

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-m", "fast", "-w", "-t", "60", "restart"
        )

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def create_cluster(
    root: Path | None = None,
    port: int | None = None,
    settings: dict[str, str] | None = None,
) -> Cluster:
    """initdb a new cluster with ``wal_level=logical`` and start it on loopback."""
    pg_bin = find_pg_bin()
    run_as = "postgres" if os.geteuid() == 0 else None
    root = Path(root or tempfile.mkdtemp(prefix="ct1-pg-"))
    root.mkdir(parents=True, exist_ok=True)
    if run_as:
        pw = pwd.getpwnam(run_as)
        os.chown(root, pw.pw_uid, pw.pw_gid)
        root.chmod(0o700)
    datadir = root / "data"
    cluster = Cluster(datadir=datadir, port=port or free_port(), bin=pg_bin, root=root, run_as=run_as)
    cluster._run(
        "initdb",
        "-D",
        str(datadir),
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
    )
    conf = {
        "listen_addresses": "'127.0.0.1'",
        "port": str(cluster.port),
        "unix_socket_directories": f"'{root}'",
        "wal_level": "logical",
        "max_replication_slots": "20",
        "max_wal_senders": "20",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "shared_buffers": "128MB",
        "max_connections": "100",
        "logical_decoding_work_mem": "64MB",
    }
    if _has_plugin_allowlist(pg_bin):
        conf["output_plugin_libraries"] = "'pgoutput, test_decoding, wal2json'"
    conf.update(settings or {})
    with open(datadir / "postgresql.conf", "a", encoding="utf-8") as fh:
        fh.write("\n# ct1-cdc throwaway cluster\n")
        for key, value in conf.items():
            fh.write(f"{key} = {value}\n")
    cluster.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probe = cluster._run("pg_isready", "-h", "127.0.0.1", "-p", str(cluster.port), check=False)
        if probe.returncode == 0:
            return cluster
        time.sleep(0.1)
    raise SetupError(f"throwaway Postgres did not start; see {cluster.log}")
