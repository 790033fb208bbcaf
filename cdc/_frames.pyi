from collections.abc import Callable
from types import ModuleType
from typing import Any

def read(conn: int, limit: int, /) -> tuple[list[Any], int]: ...
def setup(
    get_copy_data: int, freemem: int, parse_frame: Callable[[bytes], Any], decoder: ModuleType, /
) -> None: ...
