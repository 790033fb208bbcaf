"""``cdc/_frames.c`` set up for a replication connection: the libpq psycopg uses, found
and checked, so that capture's reads take many frames a call and decode their rows
straight from libpq's buffer (:meth:`cdc.stream.ReplicationStream.read_many`).

Where the reader is not built (no C compiler at install), is turned off with
``CT1_CDC_NATIVE_READ=off``, or the library cannot be found for certain, there is no
reader and the stream reads a frame a call through psycopg, as before it.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq

OFF = ("off", "0", "false", "no")


def native_reader(pgconn: pq.abc.PGconn, parse_frame: Callable[[bytes], Any]) -> Any:
    """``cdc._frames`` set up to read ``pgconn`` (what it cannot decode goes through
    ``parse_frame``), or None."""
    if os.environ.get("CT1_CDC_NATIVE_READ", "").lower() in OFF:
        return None
    loaded = load(parse_frame)
    if loaded is None:
        return None
    lib, module = loaded
    try:  # the library found is the one this connection is from: it knows its server
        conn = ctypes.c_void_p(address(pgconn))
        same = lib.PQbackendPID(conn) == pgconn.backend_pid and lib.PQsocket(conn) == pgconn.socket
    except (AttributeError, OSError, psycopg.Error):
        same = False
    return module if same else None


def address(pgconn: pq.abc.PGconn) -> int:
    """The address of libpq's ``PGconn`` under psycopg's (every implementation has it)."""
    return int(getattr(pgconn, "pgconn_ptr", 0) or 0)


@functools.cache
def load(parse_frame: Callable[[bytes], Any]) -> tuple[Any, Any] | None:
    """(the libpq psycopg uses, ``cdc._frames`` set up with it), once a process; None
    where either is missing.  (A test that sets the reader up otherwise clears this.)"""
    try:
        from cdc import _frames, _wal2json
    except ImportError:
        return None
    path = _libpq_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)  # (loaded already: the same handle)
        for check in (lib.PQbackendPID, lib.PQsocket):
            check.restype = ctypes.c_int
            check.argtypes = [ctypes.c_void_p]
        get_copy_data = ctypes.cast(lib.PQgetCopyData, ctypes.c_void_p).value
        freemem = ctypes.cast(lib.PQfreemem, ctypes.c_void_p).value
        _frames.setup(get_copy_data or 0, freemem or 0, parse_frame, _wal2json)  # (0: refused)
    except (OSError, AttributeError, ValueError, TypeError):
        return None
    return lib, _frames


def _libpq_path() -> str | None:
    """The file of the libpq psycopg calls: the one its binary wheel carries, or the only
    one its ctypes implementation loaded; None when that is not certain (psycopg_c may
    hold a libpq of its own, linked in)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {
                line.split(None, 5)[5].strip() for line in maps if "libpq" in line and line.count(" ") >= 5
            }
    except OSError:
        return None
    found = sorted(p for p in paths if os.path.basename(p).startswith("libpq") and ".so" in p)
    if pq.__impl__ == "binary":
        found = [p for p in found if "psycopg_binary" in p]
    elif pq.__impl__ != "python":
        return None
    return found[0] if len(found) == 1 else None
