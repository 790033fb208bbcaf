"""``cart.abandoned``: a cart with items, idle past ``abandon_after``, never converted (pure).

Nothing in the WAL says "abandoned"; the tracker derives it from the row changes of three
tables — carts, their items, orders — as capture reads them, with the stream's own clock:
the commit time of the transactions read, and the server's time inside capture's own
heartbeats (which come through the stream in order with everything else), never the
sidecar's wall clock.  So a cart whose conversion
committed before its deadline never fires, even while that conversion still sits in an
unread backlog.

Per cart the tracker keeps (in a :class:`CartStore`, the outbox in production, so that it
commits with the checkpoint and a crash neither loses nor repeats an abandonment):
customer, session, whether converted, the last activity and the deadline.  Activity is
any change of the cart or of one of its items; it re-arms the deadline while the cart has
items and is not converted.  A conversion is the cart's status becoming one of
``converted_statuses``, or an order of the same customer committed after the cart's last
activity and before its deadline.  When the stream's clock passes a deadline (by
:data:`CLOCK_MARGIN`, for commit times that are not quite in WAL order), the cart fires
once; new activity arms it again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

from cdc.decode import RowChange
from common.errors import ConfigError

EVENT_TYPE = "cart.abandoned"
CLOCK_MARGIN = 1.0  # seconds the stream's clock must be past a deadline before it fires
DEFAULT_ABANDON_AFTER = 3600.0
SWEEP_LIMIT = 1000  # carts fired per sweep at most (the rest fire at the next one)
CUSTOMERS_KEPT = 1_000_000  # customers with armed carts known in memory, at most (then: ask)


@dataclass(frozen=True, slots=True)
class CartRule:
    """Where carts, items and orders live, and what counts as a conversion."""

    carts: str  # schema-qualified tables, as the mapping writes them
    items: str
    orders: str | None
    abandon_after: float = DEFAULT_ABANDON_AFTER
    cart_key: str = "id"
    customer: str | None = "customer_id"
    session: str | None = "session_id"
    status: str | None = "status"
    converted_statuses: frozenset[str] = frozenset({"converted", "ordered"})
    item_key: str = "id"
    item_cart: str = "cart_id"
    product: str = "product_id"
    quantity: str = "quantity"
    price: str = "price"
    order_customer: str | None = "customer_id"
    emit: str = EVENT_TYPE

    @property
    def tables(self) -> tuple[str, ...]:
        return (self.carts, self.items) + ((self.orders,) if self.orders else ())

    def columns(self) -> list[tuple[str, str, str]]:
        """(table, setting, column) of every column the rule names, for the schema check."""
        named = [(self.carts, "cart_key", self.cart_key)]
        named += [
            (self.carts, k, c) for k, c in (("customer", self.customer), ("session", self.session)) if c
        ]
        if self.status:
            named.append((self.carts, "status", self.status))
        named += [
            (self.items, k, c)
            for k, c in (
                ("item_key", self.item_key),
                ("item_cart", self.item_cart),
                ("product", self.product),
                ("quantity", self.quantity),
                ("price", self.price),
            )
        ]
        if self.orders and self.order_customer:
            named.append((self.orders, "order_customer", self.order_customer))
        return named


_KEYS = {
    "carts",
    "items",
    "orders",
    "abandon_after",
    "cart_key",
    "customer",
    "session",
    "status",
    "converted_statuses",
    "item_key",
    "item_cart",
    "product",
    "quantity",
    "price",
    "order_customer",
}
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any, where: str) -> float:
    """``90``, ``"90s"``, ``"15m"``, ``"1h"``, ``"2d"`` → seconds (more than zero)."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value[-1:] in _UNITS:
        try:
            seconds = float(value[:-1]) * _UNITS[value[-1]]
        except ValueError:
            seconds = None
    if seconds is None or not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ConfigError(f'{where} must be a positive number of seconds or a text like "90s", "15m", "1h"')
    return seconds


def parse_cart_rule(raw: Any, source: str, table: Any) -> CartRule:
    """The ``[cart_abandoned]`` section of a mapping; ``table`` normalises a table name
    (the mapping's own parser), raising ``ValueError`` for a bad one."""
    where = f"{source}: [cart_abandoned]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    extra = set(raw) - _KEYS
    if extra:
        raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r} (expected {', '.join(sorted(_KEYS))})")
    for required in ("carts", "items"):
        if required not in raw:
            raise ConfigError(f"{where}: missing {required!r} (the schema-qualified {required} table)")
    values: dict[str, Any] = {}
    for name in ("carts", "items", "orders"):
        if name in raw:
            try:
                values[name] = table(raw[name])
            except ValueError:
                raise ConfigError(f"{where}.{name}: {raw[name]!r} is not a schema-qualified table") from None
    values.setdefault("orders", None)
    if len({values["carts"], values["items"], values["orders"]} - {None}) < 2 + bool(values["orders"]):
        raise ConfigError(f"{where}: carts, items and orders must be three different tables")
    if "abandon_after" in raw:
        values["abandon_after"] = parse_duration(raw["abandon_after"], f"{where}.abandon_after")
    optional = {"customer", "session", "status", "order_customer"}
    for name in ("cart_key", "item_key", "item_cart", "product", "quantity", "price", *sorted(optional)):
        if name not in raw:
            continue
        column = raw[name]
        if name in optional and column == "":
            values[name] = None  # the schema has no such column
        elif isinstance(column, str) and column:
            values[name] = column
        else:
            blank = ' (or "" when there is none)' if name in optional else ""
            raise ConfigError(f"{where}.{name} must be a column name{blank}")
    if "converted_statuses" in raw:
        statuses = raw["converted_statuses"]
        if not isinstance(statuses, list) or not all(isinstance(s, str) and s for s in statuses):
            raise ConfigError(f"{where}.converted_statuses must be a list of non-empty strings")
        values["converted_statuses"] = frozenset(statuses)
    rule = CartRule(**values)
    if not (rule.customer or rule.session):
        raise ConfigError(f"{where}: customer and session cannot both be empty (whose cart is it?)")
    return rule


# -- state ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cart:
    key: str  # the cart key as text (its JSON, so 7 and "7" stay apart)
    id: Any  # the key as captured
    customer: Any = None
    session: Any = None
    converted: bool = False
    last_activity: float | None = None  # source commit time (Unix seconds)
    deadline: float | None = None  # armed when set
    ordered_at: float | None = None  # when an order of its customer last converted it
    seen: bool = False  # its own row came through the stream (else: known only from an item)


@dataclass(frozen=True, slots=True)
class Item:
    key: str
    cart: str
    product: Any
    quantity: Any
    price: Any


class StateStore(Protocol):
    """Derived events' state, kept beside the events (the outbox in production): JSON
    values by (kind, key), each optionally filed under a ``ref`` (looked up by it) and a
    ``due`` time (looked up in order of it).  Writes are part of capture's next commit."""

    def state_get(self, kind: str, key: str) -> Any | None: ...
    def state_put(self, kind: str, key: str, value: Any, ref: str | None, due: float | None) -> None: ...
    def state_delete(self, kind: str, key: str) -> None: ...
    def state_by_ref(self, kind: str, ref: str) -> list[Any]: ...
    def state_due(self, kind: str, until: float, limit: int) -> list[Any]: ...
    def state_next_due(self, kind: str) -> float | None: ...
    def state_refs(self, kind: str, limit: int) -> set[str] | None:
        """Every ref of ``kind`` in use, or None if there are more than ``limit``."""


CART, ITEM = "cart", "cart_item"


class CartStore:
    """Carts and items in a :class:`StateStore`: a cart filed under its customer and due
    at its deadline, an item filed under its cart."""

    def __init__(self, state: StateStore) -> None:
        self.state = state

    def cart(self, key: str) -> Cart | None:
        value = self.state.state_get(CART, key)
        return None if value is None else _stored_cart(value)

    def put_cart(self, cart: Cart) -> None:
        # orders find the armed carts of their customer by it: only armed ones, so a
        # customer's hundredth order does not read the carts the first one converted
        armed = cart.deadline is not None and cart.customer is not None
        ref = key_of(cart.customer) if armed else None
        value = [
            cart.key,
            cart.id,
            cart.customer,
            cart.session,
            cart.converted,
            cart.last_activity,
            cart.deadline,
            cart.ordered_at,
            cart.seen,
        ]
        self.state.state_put(CART, cart.key, value, ref, cart.deadline)

    def delete_cart(self, key: str) -> None:
        for item in self.items(key):
            self.state.state_delete(ITEM, item.key)
        self.state.state_delete(CART, key)

    def item(self, key: str) -> Item | None:
        value = self.state.state_get(ITEM, key)
        return None if value is None else Item(*value)

    def put_item(self, item: Item) -> None:
        value = [item.key, item.cart, item.product, item.quantity, item.price]
        self.state.state_put(ITEM, item.key, value, item.cart, None)

    def delete_item(self, key: str) -> None:
        self.state.state_delete(ITEM, key)

    def items(self, cart: str) -> list[Item]:
        return sorted((Item(*v) for v in self.state.state_by_ref(ITEM, cart)), key=lambda i: i.key)

    def armed_customers(self, limit: int) -> set[str] | None:
        """The customers with an armed cart (None: more than ``limit`` of them)."""
        return self.state.state_refs(CART, limit)

    def armed_carts_of(self, customer: str) -> list[Cart]:
        return [
            c for c in map(_stored_cart, self.state.state_by_ref(CART, customer)) if c.deadline is not None
        ]

    def due(self, until: float, limit: int) -> list[Cart]:
        return [_stored_cart(v) for v in self.state.state_due(CART, until, limit)]

    def next_deadline(self) -> float | None:
        return self.state.state_next_due(CART)


def _stored_cart(value: list[Any]) -> Cart:
    return Cart(*value)


@dataclass(frozen=True, slots=True)
class Abandonment:
    cart: Cart
    items: list[Item]
    at: float  # the stream's clock when it fired
    abandon_after: float

    def record(self, iso: Any) -> dict[str, Any]:
        """The event's ``data.record``; ``iso`` formats a Unix time."""
        value = Decimal(0)
        for item in self.items:
            with contextlib.suppress(InvalidOperation, ValueError):  # a missing price counts as nothing
                value += Decimal(str(item.price)) * Decimal(str(item.quantity))
        count = 0
        for item in self.items:
            count += (
                item.quantity if isinstance(item.quantity, int) and not isinstance(item.quantity, bool) else 1
            )
        assert self.cart.last_activity is not None
        return {
            "cart_id": self.cart.id,
            "customer_id": self.cart.customer,
            "session_id": self.cart.session,
            "items": [
                {"product_id": i.product, "quantity": i.quantity, "price": _text(i.price)} for i in self.items
            ],
            "value": str(value),
            "item_count": count,
            "last_activity_at": iso(self.cart.last_activity),
            "idle_seconds": round(self.at - self.cart.last_activity, 3),
            "abandon_after_seconds": self.abandon_after,
        }


def _text(value: Any) -> Any:
    return value if value is None or isinstance(value, str) else str(value)


def key_of(value: Any) -> str:
    """A key value as text that keeps its type: 7 and "7" are two carts."""
    return f"s:{value}" if isinstance(value, str) else f"n:{value}"


@dataclass(slots=True)
class CartTracker:
    """Feeds row changes and the stream's clock into the store; :meth:`due` says which
    carts fire.  Call :meth:`change` for every row change of the rule's tables, in
    stream order, with its transaction's commit time."""

    rule: CartRule
    store: CartStore
    _next: float | None = field(default=None, init=False)  # earliest deadline, once known
    _known: bool = field(default=False, init=False)
    # customers with an armed cart (a superset): an order of anyone else reads nothing.
    # None: not read yet, or too many to keep
    _customers: set[str] | None = field(default=None, init=False)
    _customers_read: bool = field(default=False, init=False)

    def watches(self, table: str) -> bool:
        return table in self.rule.tables

    def change(self, table: str, change: RowChange, at: float) -> None:
        rule = self.rule
        if table == rule.carts:
            self._cart(change, at)
        elif table == rule.items:
            self._item(change, at)
        elif table == rule.orders and change.op == "insert":
            self._order(change, at)

    # -- the three tables ------------------------------------------------------------------

    def _cart(self, change: RowChange, at: float) -> None:
        rule = self.rule
        row = change.new if change.op != "delete" else (change.old or {})
        if rule.cart_key not in row:
            return  # a delete without the key (no replica identity): nothing to go by
        key = key_of(row[rule.cart_key])
        if change.op == "delete":
            self.store.delete_cart(key)
            return
        cart = replace(self.store.cart(key) or Cart(key, row[rule.cart_key]), seen=True)
        if rule.customer and rule.customer in row:
            cart = replace(cart, customer=row[rule.customer])
        if rule.session and rule.session in row:
            cart = replace(cart, session=row[rule.session])
        if rule.status and rule.status in row:
            cart = replace(cart, converted=row[rule.status] in rule.converted_statuses)
        self._touch(cart, at)

    def _item(self, change: RowChange, at: float) -> None:
        rule = self.rule
        if change.op == "delete":
            old = change.old or {}
            if rule.item_key not in old:
                return
            item = self.store.item(key_of(old[rule.item_key]))
            if item is None:
                return
            self.store.delete_item(item.key)
            cart = self.store.cart(item.cart)
            if cart is not None:
                self._touch(cart, at)
            return
        row = change.new
        if rule.item_key not in row or rule.item_cart not in row:
            return
        key = key_of(row[rule.item_key])
        before = self.store.item(key)
        cart_key = key_of(row[rule.item_cart])
        item = Item(
            key,
            cart_key,
            row.get(rule.product, before.product if before else None),
            row.get(rule.quantity, before.quantity if before else None),
            row.get(rule.price, before.price if before else None),
        )
        self.store.put_item(item)
        if before is not None and before.cart != cart_key:
            moved_from = self.store.cart(before.cart)
            if moved_from is not None:
                self._touch(moved_from, at)
        cart = self.store.cart(cart_key) or Cart(cart_key, row[rule.item_cart])
        self._touch(cart, at)

    def _order(self, change: RowChange, at: float) -> None:
        column = self.rule.order_customer
        if not column or change.new.get(column) is None:
            return
        customer = key_of(change.new[column])
        if not self._customers_read:
            self._customers, self._customers_read = self.store.armed_customers(CUSTOMERS_KEPT), True
        if self._customers is not None and customer not in self._customers:
            return  # the common case: no open cart of this customer, known without a query
        for cart in self.store.armed_carts_of(customer):
            assert cart.deadline is not None and cart.last_activity is not None
            if cart.last_activity <= at < cart.deadline:  # ordered in time: converted
                self.store.put_cart(replace(cart, deadline=None, ordered_at=at))

    def _touch(self, cart: Cart, at: float) -> None:
        """Activity on ``cart`` at ``at``: armed again if its own row was seen, it has items
        and it is not converted (by its status, or by an order in this same transaction:
        a checkout that writes the order and then the cart)."""
        ordered_now = cart.ordered_at is not None and cart.ordered_at >= at
        armed = cart.seen and not cart.converted and not ordered_now and bool(self.store.items(cart.key))
        deadline = at + self.rule.abandon_after if armed else None
        self.store.put_cart(replace(cart, last_activity=at, deadline=deadline))
        if deadline is not None and cart.customer is not None and self._customers is not None:
            self._customers.add(key_of(cart.customer))
            if len(self._customers) > CUSTOMERS_KEPT:
                self._customers = None  # too many to keep: ask the store each time
        if deadline is not None and self._known and (self._next is None or deadline < self._next):
            self._next = deadline  # a disarmed cart leaves _next early: one needless look, no harm

    # -- the clock ---------------------------------------------------------------------------

    def due(self, clock: float, limit: int = SWEEP_LIMIT) -> list[Abandonment]:
        """The carts whose deadline the stream's ``clock`` has passed, each fired once
        (disarmed in the store, in the same commit as the events made of them)."""
        until = clock - CLOCK_MARGIN
        if self._known and (self._next is None or self._next > until):
            return []  # the common case: nothing due, known without asking the store
        fired = []
        for cart in self.store.due(until, limit):
            fired.append(Abandonment(cart, self.store.items(cart.key), clock, self.rule.abandon_after))
            self.store.put_cart(replace(cart, deadline=None))
        if len(fired) < limit:
            self._next, self._known = self.store.next_deadline(), True
        return fired

    def forget(self) -> None:
        """The store changed under the tracker (a rollback): ask it again."""
        self._known = False
        self._customers, self._customers_read = None, False
