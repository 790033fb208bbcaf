"""The outbox has one owner: every statement that touches it lives in ``outbox/``, behind
functions named for what they do; the CLI, the API and the dispatcher call those.

Read from the source (nothing is imported), over every package the distribution ships
but ``outbox`` itself.  Three nets, each naming what it caught by file and line:

* SQL text outside ``outbox/`` that names an outbox table (the tables are read from the
  migrations) or that only SQLite runs (``PRAGMA``, ``BEGIN IMMEDIATE``), in string
  literals other than docstrings and in ``.sql`` files;
* the outbox's statements reached from outside: its SQL files named, or the blocks an
  outbox module loads (``store.Q``, ``from outbox.keys import K``, ...) imported or used;
* ``.execute`` (or ``executemany``, ``executescript``) on a SQLite connection: a name or
  attribute annotated ``sqlite3.Connection``, a call of something annotated to return
  one, a connection opened with ``outbox.store.connect``/``open_outbox`` or
  ``sqlite3.connect``, or a name assigned one of those.

Statements against the source Postgres (exports, the catalog, the sample marketplace)
name none of these and are not caught.  ``tests/`` and ``bench/`` are not scanned: they
look into the store from outside to check what the program did, and are not the program.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OWNER = "outbox"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
OUTSIDE = sorted(set(PYPROJECT["tool"]["setuptools"]["packages"]) - {OWNER})

MIGRATIONS = (ROOT / OWNER / "sql" / "migrations.sql").read_text(encoding="utf-8")
TABLES = sorted(set(re.findall(r"CREATE TABLE (\w+)", MIGRATIONS)) | {"sqlite_sequence", "sqlite_master"})
TABLE_NAMES = "|".join(TABLES)
OUTBOX_SQL = re.compile(
    rf"\b(?:FROM|INTO|UPDATE|JOIN|TABLE)\s+(?:{TABLE_NAMES})\b|\bPRAGMA\s|\bBEGIN\s+IMMEDIATE\b"
)
SQL_FILES = sorted(p.name for p in (ROOT / OWNER / "sql").glob("*.sql"))
EXECUTE = {"execute", "executemany", "executescript"}
SQLITE_TYPES = re.compile(r"\bsqlite3\.(?:Connection|Cursor)\b")
OPENERS = {"connect", "open_outbox"}  # of outbox.store (and sqlite3.connect)


def sources(packages: list[str]) -> Iterator[Path]:
    for package in packages:
        yield from sorted((ROOT / package).rglob("*.py"))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def block_names() -> dict[str, set[str]]:
    """Per outbox module, the module-level names holding SQL blocks it loads."""
    found: dict[str, set[str]] = {}
    for path in sources([OWNER]):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and ast.unparse(node.value.func) in {"sqlfile.load", "load"}
            ):
                names = {t.id for t in node.targets if isinstance(t, ast.Name)}
                found.setdefault(f"{OWNER}.{path.stem}", set()).update(names)
    return found


BLOCKS = block_names()


def docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def sql_text_findings(path: Path, tree: ast.Module) -> list[str]:
    skip = docstrings(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if match := OUTBOX_SQL.search(node.value):
                out.append(f"{rel(path)}:{node.lineno}: outbox SQL {match.group(0)!r}")
            if node.value in SQL_FILES or any(node.value.endswith(f"/{name}") for name in SQL_FILES):
                out.append(f"{rel(path)}:{node.lineno}: names the outbox's {node.value}")
    return out


def block_findings(path: Path, tree: ast.Module) -> list[str]:
    """The outbox's SQL blocks imported or used, and its SQL loaded, from outside."""
    out = []
    aliases: dict[str, str] = {}  # local name -> outbox module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in BLOCKS:  # from outbox import store
                    aliases[alias.asname or alias.name] = full
                elif alias.name in BLOCKS.get(node.module, ()):  # from outbox.store import Q
                    out.append(f"{rel(path)}:{node.lineno}: imports {full}, SQL of the outbox")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in BLOCKS and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.attr in BLOCKS.get(aliases.get(node.value.id, ""), ())
        ):
            out.append(
                f"{rel(path)}:{node.lineno}: uses {aliases[node.value.id]}.{node.attr}, SQL of the outbox"
            )
        if (
            isinstance(node, ast.Call)
            and ast.unparse(node.func).endswith(("sqlfile.load", "sqlfile.text"))
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == OWNER
        ):
            out.append(f"{rel(path)}:{node.lineno}: loads SQL of the outbox")
    return out


def sqlite_kind(annotation: ast.expr | None) -> str | None:
    """``conn`` for an annotation of a connection (or cursor), ``giver`` for a callable
    returning one, else None."""
    if annotation is None or not SQLITE_TYPES.search(ast.unparse(annotation)):
        return None
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value).endswith("Callable"):
        parts = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else []
        return "giver" if len(parts) == 2 and SQLITE_TYPES.search(ast.unparse(parts[1])) else None
    return "conn"


def terminal(node: ast.expr) -> str | None:
    """``x`` of ``x`` or ``self.x``."""
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


class Connections(ast.NodeVisitor):
    """``.execute`` on a SQLite connection.  Local names are per function; attributes
    (``self.x``) and callables that give a connection hold module-wide, learnt in a
    first pass and used in a second."""

    def __init__(self, path: Path, tree: ast.Module) -> None:
        self.path = path
        self.out: list[str] = []
        self.stores = {  # local names of outbox.store
            a.asname or a.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == OWNER
            for a in node.names
            if a.name == "store"
        }
        self.attrs: set[str] = set()
        self.givers = {
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and sqlite_kind(node.returns)
        }
        for self.final in (False, True):
            self.scopes: list[set[str]] = [set()]
            self.visit(tree)

    def _is_conn(self, node: ast.expr) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.scopes[-1]
        if isinstance(node, ast.Attribute):
            return node.attr in self.attrs
        if isinstance(node, ast.Call):
            func = node.func
            if terminal(func) in self.givers:
                return True
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                return (func.value.id, func.attr) == ("sqlite3", "connect") or (
                    func.value.id in self.stores and func.attr in OPENERS
                )
        return False

    def _learn(self, target: ast.expr, kind: str | None) -> None:
        name = terminal(target)
        if name is None or kind is None:
            return
        if kind == "giver":
            self.givers.add(name)
        elif isinstance(target, ast.Attribute):
            self.attrs.add(name)
        else:
            self.scopes[-1].add(name)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scopes.append(set(self.scopes[-1]))
        arguments = node.args
        for arg in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]:
            self._learn(ast.Name(arg.arg), sqlite_kind(arg.annotation))
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def _kind_of(self, value: ast.expr | None) -> str | None:
        if value is None:
            return None
        if self._is_conn(value):
            return "conn"
        return "giver" if terminal(value) in self.givers and not isinstance(value, ast.Call) else None

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            self._learn(target, self._kind_of(node.value))
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._learn(node.target, sqlite_kind(node.annotation) or self._kind_of(node.value))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (
            self.final
            and isinstance(func, ast.Attribute)
            and func.attr in EXECUTE
            and self._is_conn(func.value)
        ):
            self.out.append(f"{rel(self.path)}:{node.lineno}: {ast.unparse(func)}() on an outbox connection")
        self.generic_visit(node)


def findings(packages: list[str]) -> list[str]:
    out = []
    for path in sources(packages):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        out += sql_text_findings(path, tree) + block_findings(path, tree) + Connections(path, tree).out
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.sql")):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.lstrip().startswith("--") and (match := OUTBOX_SQL.search(line)):
                    out.append(f"{rel(path)}:{n}: outbox SQL {match.group(0)!r}")
    return out


def test_the_nets_see_the_outbox():
    """What the test reads is real: the tables, the SQL files and the blocks the outbox loads."""
    assert {"events", "deliveries", "checkpoint", "api_keys", "endpoints", "mapping_problems"} <= set(TABLES)
    assert "queries.sql" in SQL_FILES and "Q" in BLOCKS["outbox.store"]
    # and each net catches what it is for in the outbox itself, where it all belongs
    caught = "\n".join(findings([OWNER]))
    for net in (
        "outbox SQL 'PRAGMA ",
        "outbox SQL 'FROM checkpoint'",
        "SQL of the outbox",
        "on an outbox connection",
    ):
        assert net in caught, net


def test_every_outbox_statement_lives_in_the_outbox():
    found = findings(OUTSIDE)
    assert not found, "outbox statements outside outbox/ (move them behind a function there):\n" + "\n".join(
        found
    )
