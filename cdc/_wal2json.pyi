from collections.abc import Callable
from typing import Any

def decode_row(payload: bytes | memoryview, /) -> object | None: ...
def setup(
    rowchange: type[tuple[Any, ...]],
    convert: Callable[[str, Any], Any],
    begin: type = ...,
    commit: type = ...,
    /,
) -> None: ...
