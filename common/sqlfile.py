"""Named SQL blocks in ``.sql`` files, loaded once.

A file holds blocks that each start with a ``-- name: NAME`` line::

    -- name: append_event
    INSERT INTO events ...
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

_NAME = re.compile(r"^--\s*name:\s*(\S+)\s*$", re.MULTILINE)


def parse_blocks(text: str) -> dict[str, str]:
    blocks: dict[str, str] = {}
    parts = _NAME.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in blocks:
            raise ValueError(f"duplicate SQL block {name!r}")
        blocks[name] = body.strip()
    return blocks


@cache
def load(path: str | Path) -> dict[str, str]:
    return parse_blocks(Path(path).read_text(encoding="utf-8"))
