"""The blocking client (``httpx.Client``); :mod:`ct1_client._async` is the same on
``httpx.AsyncClient``. Both only send what :mod:`ct1_client._core` describes."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import FrameType, TracebackType
from typing import Any, Generic, Literal, TypeVar, Unpack

import httpx
from pydantic import BaseModel

import ct1_client._core as _core
from ct1_client._core import (
    Backoff,
    Call,
    CustomerFilters,
    ExportKind,
    OrderFilters,
    Overlap,
    Pager,
    ProductFilters,
    ReviewFilters,
    SseParser,
)
from ct1_client.errors import RETRYABLE, Ct1Error, Unavailable, error_for
from ct1_client.models import (
    Analytics,
    AnyEvent,
    CustomerDetail,
    CustomerRow,
    OrderDetail,
    OrderRow,
    ProductDetail,
    ProductRow,
    ReviewRow,
    parse_event,
)
from ct1_client.positions import MemoryPosition, PositionStore, Tracked

log = logging.getLogger("ct1_client")

T = TypeVar("T", bound=BaseModel)
Handler = Callable[[AnyEvent], object]
Mode = Literal["sse", "poll"]

USER_AGENT = "ct1-cdc-client/0.2"


class Rows(Generic[T]):
    """The rows of a list export, fetched as they are iterated: keyset pages, or one
    ndjson stream (``stream=True``: one snapshot, constant memory).

    ``resume_event_id`` is where to follow ``/events`` from once the rows are applied
    (known after the first page; ``None`` if capture was behind: seed again)."""

    def __init__(
        self, client: Client, kind: ExportKind[T], params: dict[str, str], per_page: int, stream: bool
    ) -> None:
        self._client, self.kind, self.stream = client, kind, stream
        self._per_page = per_page
        self._pager = Pager(kind, params, per_page)
        self._params = params
        self._stream_position: int | None = None
        self.require_position = False
        self.retries: int | None = None  # per page; None: the client's

    @property
    def resume_event_id(self) -> int | None:
        return self._stream_position if self.stream else self._pager.resume_event_id

    def overlap(self) -> Overlap:
        """Which tail events the rows already hold (none for a stream: one snapshot)."""
        if self.stream:
            return Overlap(None, self._stream_position, [], [])
        return self._pager.overlap()

    def __iter__(self) -> Iterator[T]:
        if self.stream:
            yield from self._ndjson()
            return
        self._pager = Pager(self.kind, self._params, self._per_page)  # each iteration reads anew
        while (call := self._pager.call()) is not None:
            rows = self._pager.feed(self._client._get(call, self.retries))
            if self.require_position and self._pager.pages == 1 and self._pager.resume_event_id is None:
                raise _core.no_position(self.kind)
            yield from rows

    def _ndjson(self) -> Iterator[T]:
        call = Call(self.kind.path, {**self._params, "format": "ndjson"})
        with self._client._open(call) as response:
            header = response.headers.get(_core.RESUME_HEADER)
            self._stream_position = int(header) if header and header.isdigit() else None
            if self.require_position and self._stream_position is None:
                raise _core.no_position(self.kind)
            try:
                for line in response.iter_lines():
                    if line.strip():
                        yield self.kind.row.model_validate_json(line)
            except httpx.TransportError as exc:
                raise Unavailable(f"the {self.kind.name} export broke off: {exc}") from exc

    def list(self) -> list[T]:
        return list(self)


class _Interrupted(Exception):
    """A stop asked for while waiting on the network."""


class _Stopper:
    """SIGTERM and SIGINT (when asked, in the main thread) or ``event`` stop a consumer:
    a handler already running finishes and its position is saved; a wait on the network
    is cut short at once. The signal handler only sets a flag (or, while waiting, raises):
    it takes no lock the interrupted code might hold."""

    def __init__(self, signals: bool, event: threading.Event | None) -> None:
        self.event = event
        self.signals = signals and threading.current_thread() is threading.main_thread()
        self._signalled = False
        self._waiting = False
        self._saved: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self._signalled or (self.event is not None and self.event.is_set())

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = True
        if self._waiting:
            raise _Interrupted

    def __enter__(self) -> _Stopper:
        if self.signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._saved[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._saved.items():
            signal.signal(sig, previous)
        if self._signalled:
            log.info("ct1_client_stopped_by_signal")

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        if self.requested:
            raise _Interrupted
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        with self.waiting():
            while not self.requested and (left := end - time.monotonic()) > 0:
                time.sleep(min(left, 0.2))  # short steps: ``event`` is seen within 0.2 s


class Client:
    """ct1-cdc's HTTP API for CT2/CT3, blocking.

    >>> with Client("http://127.0.0.1:8080", key) as ct1:
    ...     for order in ct1.seller_orders(3, status="shipped"):
    ...         print(order.id, order.total)

    ``retries``: how often a single request is tried again after a 429 (waiting its
    ``Retry-After``), a 503 or a lost connection (with backoff) before the error is raised.
    """

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        timeout: float = 30.0,
        retries: int = 2,
        http: httpx.Client | None = None,
    ) -> None:
        self.retries = retries
        self._http = http or httpx.Client(timeout=timeout)
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {key}", "User-Agent": USER_AGENT}

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- transport ------------------------------------------------------------------------------

    def _get(self, call: Call, retries: int | None = None) -> dict[str, Any]:
        backoff = Backoff()
        left = self.retries if retries is None else retries
        while True:
            try:
                response = self._http.get(
                    self._base + call.url,
                    params=call.params,
                    headers={**self._headers, **call.headers},
                    timeout=call.timeout if call.timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
                return _core.unwrap(response.status_code, response.headers, response.content)
            except httpx.TransportError as exc:
                error: Ct1Error = Unavailable(f"cannot reach ct1-cdc at {self._base}: {exc!r}")
                cause: Exception = exc
            except RETRYABLE as exc:
                error, cause = exc, exc
            if left <= 0:
                raise error from cause
            left -= 1
            time.sleep(backoff.delay(error))

    @contextlib.contextmanager
    def _open(self, call: Call) -> Iterator[httpx.Response]:
        """A streamed GET: the response while its body is read."""
        try:
            with self._http.stream(
                "GET",
                self._base + call.url,
                params=call.params,
                headers={**self._headers, **call.headers},
                timeout=call.timeout if call.timeout is not None else httpx.USE_CLIENT_DEFAULT,
            ) as response:
                if response.status_code != 200:
                    raise error_for(response.status_code, response.read(), response.headers)
                yield response
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach ct1-cdc at {self._base}: {exc!r}") from exc

    # -- exports --------------------------------------------------------------------------------

    def export(
        self, name: str, *, per_page: int = _core.MAX_PER_PAGE, stream: bool = False, **filters: Any
    ) -> Rows[Any]:
        """Any list export by name (``customers``, ``orders``, ``products``, ``reviews``)."""
        kind = _core.export_kind(name)
        return Rows(self, kind, _core.query(kind.filters, **filters), per_page, stream)

    def customers(
        self, *, per_page: int = _core.MAX_PER_PAGE, stream: bool = False, **filters: Unpack[CustomerFilters]
    ) -> Rows[CustomerRow]:
        return self.export("customers", per_page=per_page, stream=stream, **filters)

    def orders(
        self, *, per_page: int = _core.MAX_PER_PAGE, stream: bool = False, **filters: Unpack[OrderFilters]
    ) -> Rows[OrderRow]:
        return self.export("orders", per_page=per_page, stream=stream, **filters)

    def seller_orders(
        self, seller_id: int, *, per_page: int = _core.MAX_PER_PAGE, stream: bool = False, **filters: Any
    ) -> Rows[OrderRow]:
        """A seller's orders (CT2's daily call); other order filters as :meth:`orders`."""
        return self.export("orders", per_page=per_page, stream=stream, seller_id=seller_id, **filters)

    def products(
        self, *, per_page: int = _core.MAX_PER_PAGE, stream: bool = False, **filters: Unpack[ProductFilters]
    ) -> Rows[ProductRow]:
        return self.export("products", per_page=per_page, stream=stream, **filters)

    def reviews(
        self, *, per_page: int = _core.MAX_PER_PAGE, stream: bool = False, **filters: Unpack[ReviewFilters]
    ) -> Rows[ReviewRow]:
        return self.export("reviews", per_page=per_page, stream=stream, **filters)

    def product_reviews(
        self, product_id: int, *, per_page: int = _core.MAX_PER_PAGE, stream: bool = False, **filters: Any
    ) -> Rows[ReviewRow]:
        """A product's reviews; other review filters as :meth:`reviews`."""
        return self.export("reviews", per_page=per_page, stream=stream, product_id=product_id, **filters)

    def customer(
        self,
        customer_id: int,
        *,
        date_from: _core.DateLike | None = None,
        date_to: _core.DateLike | None = None,
        orders: int | None = None,
    ) -> CustomerDetail:
        """The customer, its addresses, statistics and its ``orders`` most recent orders."""
        params = _core.query(date_from=date_from, date_to=date_to, per_page=orders)
        return self._detail("customer", customer_id, params, CustomerDetail)

    def order(self, order_id: int) -> OrderDetail:
        """The order with items, parties, payment, shipping and status history."""
        return self._detail("order", order_id, {}, OrderDetail)

    def product(
        self,
        product_id: int,
        *,
        date_from: _core.DateLike | None = None,
        date_to: _core.DateLike | None = None,
    ) -> ProductDetail:
        """The product with shop, category, ratings, stock, SEO and its performance."""
        return self._detail(
            "product", product_id, _core.query(date_from=date_from, date_to=date_to), ProductDetail
        )

    def analytics(
        self, *, date_from: _core.DateLike | None = None, date_to: _core.DateLike | None = None
    ) -> Analytics:
        """The marketplace's figures over the period (default: the last 30 days)."""
        body = self._get(Call("/analytics", _core.query(date_from=date_from, date_to=date_to)))
        return Analytics.model_validate(body["data"])

    def _detail(self, what: str, ident: int, params: dict[str, str], model: type[T]) -> T:
        path = _core.DETAILS[what][0].format(id=int(ident))
        return model.model_validate(self._get(Call(path, params))["data"])

    # -- events ---------------------------------------------------------------------------------

    def events(
        self, last_event_id: int = 0, *, event_types: str | Iterable[str] | None = None, limit: int = 100
    ) -> Iterator[AnyEvent]:
        """The events after ``last_event_id``, page by page, until there are no more (a
        catch-up read; :meth:`consume` keeps following)."""
        types = _core.event_types(event_types)
        after = last_event_id
        while True:
            events, got_to = _core.events_page(self._get(_core.events_call(after, types, limit, 0)))
            yield from events
            if len(events) < limit:
                return
            after = got_to

    def consume(
        self,
        handle: Handler,
        *,
        position: PositionStore | None = None,
        event_types: str | Iterable[str] | None = None,
        mode: Mode = "sse",
        start_after: int = 0,
        limit: int = 100,
        wait: float = 25.0,
        handle_signals: bool = True,
        stop: threading.Event | None = None,
    ) -> int:
        """Follow ``/events`` for good, handing each event to ``handle`` in id order.

        At least once: the position is saved in ``position`` only after ``handle``
        returned for the events of a batch (a page, or what one read of the stream
        brought), so a consumer killed mid-batch sees that batch again, and nothing it
        never handled is skipped. If ``handle`` raises, the position of the events handled
        before it is saved and the exception propagates. Lost connections, restarts of the
        API, 429 (after its ``Retry-After``) and 5xx are retried with backoff; a key that
        is refused (401, 403) or a bad filter (422) raise.

        SIGTERM and SIGINT stop it cleanly (in the main thread, unless
        ``handle_signals=False``), as does setting ``stop``: it returns the last event
        handled.
        """
        loaded = (position or MemoryPosition()).load()
        after = start_after if loaded is None else loaded
        store = Tracked(position or MemoryPosition(), after)
        types = _core.event_types(event_types)
        backoff = Backoff()
        if mode == "poll" and wait <= 0:
            raise ValueError("consume(mode='poll') needs wait > 0: it long-polls for what comes next")
        with _Stopper(handle_signals, stop) as stopper, _core.reraise_handler_errors():
            while not stopper.requested:
                try:
                    if mode == "poll":
                        self._poll_once(handle, store, stopper, store.last, types, limit, wait)
                    else:
                        self._stream_once(handle, store, stopper, store.last, types, limit, backoff)
                    backoff.reset()
                except _Interrupted:
                    break
                except httpx.TransportError as exc:
                    self._pause(stopper, backoff, Unavailable(f"lost ct1-cdc at {self._base}: {exc!r}"))
                except RETRYABLE as exc:
                    self._pause(stopper, backoff, exc)
        return store.last

    def seed_then_tail(
        self,
        export: str,
        on_row: Callable[[Any], object],
        on_event: Handler,
        *,
        position: PositionStore,
        event_types: str | Iterable[str] | _core.Default | None = _core.DEFAULT,
        mode: Mode = "sse",
        per_page: int = _core.MAX_PER_PAGE,
        stream: bool = False,
        handle_signals: bool = True,
        stop: threading.Event | None = None,
        on_seed_start: Callable[[], object] | None = None,
        **filters: Any,
    ) -> int:
        """Seed a new consumer from an export, then follow ``/events`` from where the
        export was read: no change missed, none applied twice (docs/api.md, "Seed a new
        consumer").

        When ``position`` holds nothing yet, every row of ``export`` (``customers``,
        ``orders``, ``products``, ``reviews``, with its filters) goes to ``on_row``, then
        the export's resume position is saved; later runs skip straight to the tail. The
        tail hands ``on_event`` the events of the export's object (``order.*`` and
        ``payment.status_changed`` for orders; ``event_types`` to choose), leaving out those
        a later page already held. The filters apply to the export only: ``on_event`` gets
        every matching event, and applies its own filter (e.g. the seller). A seed that
        has no position yet (capture stopped or behind) starts again after a backoff; a
        page that fails is tried again (up to ``SEED_PAGE_RETRIES`` times, with backoff)
        before the seed starts over; a seed cut short (``stop``, a kill) saves nothing, so
        the next run seeds again. ``on_row`` must be an upsert, and ``on_seed_start`` (called
        before each attempt) can empty the copy, since a row a failed attempt stored may be
        deleted before the next one reads.
        """
        kind = _core.export_kind(export)
        seeded: Overlap | None = None
        backoff = Backoff()
        while position.load() is None:
            if on_seed_start is not None:
                on_seed_start()  # e.g. empty the copy: rows a failed seed left may be gone since
            rows = self.export(export, per_page=per_page, stream=stream, **filters)
            rows.require_position = True
            rows.retries = _core.SEED_PAGE_RETRIES
            try:
                for row in rows:
                    if stop is not None and stop.is_set():
                        return position.load() or 0  # nothing saved: the next run seeds again
                    on_row(row)
            except RETRYABLE as exc:  # no position yet (capture behind), a 503, a lost API
                delay = backoff.delay(exc)
                log.warning("ct1_client_seed_retrying in=%.1fs error=%s", delay, exc)
                time.sleep(delay)
                continue
            seeded = rows.overlap()
            assert seeded.resume_event_id is not None  # require_position
            position.save(seeded.resume_event_id)
            log.info("ct1_client_seeded export=%s resume_event_id=%s", export, seeded.resume_event_id)

        def handle(event: AnyEvent) -> None:
            if seeded is None or not seeded.already_in(event):
                on_event(event)

        return self.consume(
            handle,
            position=position,
            event_types=_core.tail_types(kind, event_types),
            mode=mode,
            handle_signals=handle_signals,
            stop=stop,
        )

    def _pause(self, stopper: _Stopper, backoff: Backoff, error: Ct1Error) -> None:
        delay = backoff.delay(error)
        log.warning("ct1_client_retrying in=%.1fs error=%s", delay, error)
        with contextlib.suppress(_Interrupted):
            stopper.sleep(delay)

    def _poll_once(
        self,
        handle: Handler,
        store: PositionStore,
        stopper: _Stopper,
        after: int,
        types: str | None,
        limit: int,
        wait: float,
    ) -> int:
        with stopper.waiting():
            body = self._get(_core.events_call(after, types, limit, wait), retries=0)
        events, got_to = _core.events_page(body)
        done = _handle_all(handle, events, store, after, stopper)
        if done is not None:
            return done
        if got_to != after:
            store.save(got_to)
        return got_to

    def _stream_once(
        self,
        handle: Handler,
        store: PositionStore,
        stopper: _Stopper,
        after: int,
        types: str | None,
        limit: int,
        backoff: Backoff,
    ) -> int:
        parser = SseParser()
        with stopper.waiting(), self._open(_core.stream_call(after, types)) as response:
            chunks = response.iter_bytes()
            while True:
                chunk = next(chunks, None)  # waiting: a stop cuts it short
                if chunk is None:
                    raise Unavailable("the event stream ended (the API restarted?)")
                events = []
                for message in parser.feed(chunk):
                    if message.event == "error":
                        raise _core.stream_error(message)
                    if message.id is not None and message.id.isdigit():
                        events.append(parse_event(json.loads(message.data)))
                if not events:
                    continue
                backoff.reset()
                stopper._waiting = False
                for start in range(0, len(events), limit):  # a batch: at most ``limit`` events
                    batch = events[start : start + limit]
                    done = _handle_all(handle, batch, store, after, stopper)
                    after = int(batch[-1].id or after) if done is None else done
                    if done is not None or stopper.requested:
                        return after
                stopper._waiting = True


def _handle_all(
    handle: Handler, events: list[AnyEvent], store: PositionStore, after: int, stopper: _Stopper
) -> int | None:
    """Hand a batch to ``handle`` and save the position after it; on a stop asked for
    meanwhile or a failing handler, save what was handled. ``None`` when all of it was."""
    handled = after
    try:
        for event in events:
            try:
                handle(event)
            except Exception as exc:  # the user's error, not ours: never retried as one
                raise _core.HandlerFailed from exc
            handled = int(event.id or handled)
            if stopper.requested:
                break
    finally:
        if handled != after:
            store.save(handled)
    if events and handled != int(events[-1].id or after):
        return handled
    return None
