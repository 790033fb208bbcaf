"""The project's exceptions: one root, and the few kinds the edges translate into."""

from __future__ import annotations


class Ct1Error(Exception):
    """Root of every error ct1-cdc raises on purpose.  ``str()`` is one line for a user."""


class ConfigError(Ct1Error):
    """A setting or the mapping file is wrong; names the key and what is wrong."""


class SetupError(Ct1Error):
    """The source or the machine is not ready; names the exact fix."""


class SourceUnavailable(Ct1Error):
    """The source Postgres cannot be reached or dropped the connection (retryable)."""


class DecodeError(Ct1Error):
    """A wal2json message could not be understood (permanent: a bug or a plugin change)."""


class CaptureError(Ct1Error):
    """Capture cannot go past one source transaction; names the table, key, LSN and how to
    move past it (``ct1-cdc slot skip XID``)."""


class SlotBusy(SourceUnavailable):
    """Another reader holds the replication slot (another capture: this one is a standby)."""


class SlotLost(SetupError):
    """The replication slot can no longer give the changes capture needs (invalidated, or
    dropped): the history after the checkpoint is gone; capture stops rather than resume
    from "now" without a word."""
