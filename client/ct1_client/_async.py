"""The asyncio client (``httpx.AsyncClient``): the same calls as :class:`ct1_client.Client`,
awaited; handlers may be functions or coroutines."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, Generic, TypeVar, Unpack

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
from ct1_client._sync import USER_AGENT, Mode
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
R = TypeVar("R")
AsyncHandler = Callable[[AnyEvent], Awaitable[object] | object]


class AsyncRows(Generic[T]):
    """The rows of a list export, as :class:`ct1_client.Rows`, iterated with ``async for``."""

    def __init__(
        self, client: AsyncClient, kind: ExportKind[T], params: dict[str, str], per_page: int, stream: bool
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
        if self.stream:
            return Overlap(None, self._stream_position, [], [])
        return self._pager.overlap()

    async def __aiter__(self) -> AsyncIterator[T]:
        if self.stream:
            async for row in self._ndjson():
                yield row
            return
        self._pager = Pager(self.kind, self._params, self._per_page)  # each iteration reads anew
        while (call := self._pager.call()) is not None:
            rows = self._pager.feed(await self._client._get(call, self.retries))
            if self.require_position and self._pager.pages == 1 and self._pager.resume_event_id is None:
                raise _core.no_position(self.kind)
            for row in rows:
                yield row

    async def _ndjson(self) -> AsyncIterator[T]:
        call = Call(self.kind.path, {**self._params, "format": "ndjson"})
        async with self._client._open(call) as response:
            header = response.headers.get(_core.RESUME_HEADER)
            self._stream_position = int(header) if header and header.isdigit() else None
            if self.require_position and self._stream_position is None:
                raise _core.no_position(self.kind)
            try:
                async for line in response.aiter_lines():
                    if line.strip():
                        yield self.kind.row.model_validate_json(line)
            except httpx.TransportError as exc:
                raise Unavailable(f"the {self.kind.name} export broke off: {exc}") from exc

    async def list(self) -> list[T]:
        return [row async for row in self]


class _Stopped(Exception):
    """A stop asked for while waiting on the network."""


class AsyncClient:
    """ct1-cdc's HTTP API for CT2/CT3, for asyncio.

    >>> async with AsyncClient("http://127.0.0.1:8080", key) as ct1:
    ...     async for review in ct1.product_reviews(7, rating=5):
    ...         print(review.title)
    """

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        timeout: float = 30.0,
        retries: int = 2,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.retries = retries
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {key}", "User-Agent": USER_AGENT}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    # -- transport ------------------------------------------------------------------------------

    async def _get(self, call: Call, retries: int | None = None) -> dict[str, Any]:
        backoff = Backoff()
        left = self.retries if retries is None else retries
        while True:
            try:
                response = await self._http.get(
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
            await asyncio.sleep(backoff.delay(error))

    @contextlib.asynccontextmanager
    async def _open(self, call: Call) -> AsyncIterator[httpx.Response]:
        try:
            async with self._http.stream(
                "GET",
                self._base + call.url,
                params=call.params,
                headers={**self._headers, **call.headers},
                timeout=call.timeout if call.timeout is not None else httpx.USE_CLIENT_DEFAULT,
            ) as response:
                if response.status_code != 200:
                    raise error_for(response.status_code, await response.aread(), response.headers)
                yield response
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach ct1-cdc at {self._base}: {exc!r}") from exc

    # -- exports --------------------------------------------------------------------------------

    def export(
        self, name: str, *, per_page: int = _core.MAX_PER_PAGE, stream: bool = False, **filters: Any
    ) -> AsyncRows[Any]:
        kind = _core.export_kind(name)
        return AsyncRows(self, kind, _core.query(kind.filters, **filters), per_page, stream)

    def customers(
        self, *, per_page: int = _core.MAX_PER_PAGE, stream: bool = False, **filters: Unpack[CustomerFilters]
    ) -> AsyncRows[CustomerRow]:
        return self.export("customers", per_page=per_page, stream=stream, **filters)

    def orders(
        self, *, per_page: int = _core.MAX_PER_PAGE, stream: bool = False, **filters: Unpack[OrderFilters]
    ) -> AsyncRows[OrderRow]:
        return self.export("orders", per_page=per_page, stream=stream, **filters)

    def seller_orders(
        self, seller_id: int, *, per_page: int = _core.MAX_PER_PAGE, stream: bool = False, **filters: Any
    ) -> AsyncRows[OrderRow]:
        return self.export("orders", per_page=per_page, stream=stream, seller_id=seller_id, **filters)

    def products(
        self, *, per_page: int = _core.MAX_PER_PAGE, stream: bool = False, **filters: Unpack[ProductFilters]
    ) -> AsyncRows[ProductRow]:
        return self.export("products", per_page=per_page, stream=stream, **filters)

    def reviews(
        self, *, per_page: int = _core.MAX_PER_PAGE, stream: bool = False, **filters: Unpack[ReviewFilters]
    ) -> AsyncRows[ReviewRow]:
        return self.export("reviews", per_page=per_page, stream=stream, **filters)

    def product_reviews(
        self, product_id: int, *, per_page: int = _core.MAX_PER_PAGE, stream: bool = False, **filters: Any
    ) -> AsyncRows[ReviewRow]:
        return self.export("reviews", per_page=per_page, stream=stream, product_id=product_id, **filters)

    async def customer(
        self,
        customer_id: int,
        *,
        date_from: _core.DateLike | None = None,
        date_to: _core.DateLike | None = None,
        orders: int | None = None,
    ) -> CustomerDetail:
        params = _core.query(date_from=date_from, date_to=date_to, per_page=orders)
        return await self._detail("customer", customer_id, params, CustomerDetail)

    async def order(self, order_id: int) -> OrderDetail:
        return await self._detail("order", order_id, {}, OrderDetail)

    async def product(
        self,
        product_id: int,
        *,
        date_from: _core.DateLike | None = None,
        date_to: _core.DateLike | None = None,
    ) -> ProductDetail:
        params = _core.query(date_from=date_from, date_to=date_to)
        return await self._detail("product", product_id, params, ProductDetail)

    async def analytics(
        self, *, date_from: _core.DateLike | None = None, date_to: _core.DateLike | None = None
    ) -> Analytics:
        body = await self._get(Call("/analytics", _core.query(date_from=date_from, date_to=date_to)))
        return Analytics.model_validate(body["data"])

    async def _detail(self, what: str, ident: int, params: dict[str, str], model: type[T]) -> T:
        path = _core.DETAILS[what][0].format(id=int(ident))
        return model.model_validate((await self._get(Call(path, params)))["data"])

    # -- events ---------------------------------------------------------------------------------

    async def events(
        self, last_event_id: int = 0, *, event_types: str | Iterable[str] | None = None, limit: int = 100
    ) -> AsyncIterator[AnyEvent]:
        types = _core.event_types(event_types)
        after = last_event_id
        while True:
            events, got_to = _core.events_page(await self._get(_core.events_call(after, types, limit, 0)))
            for event in events:
                yield event
            if len(events) < limit:
                return
            after = got_to

    async def consume(
        self,
        handle: AsyncHandler,
        *,
        position: PositionStore | None = None,
        event_types: str | Iterable[str] | None = None,
        mode: Mode = "sse",
        start_after: int = 0,
        limit: int = 100,
        wait: float = 25.0,
        handle_signals: bool = True,
        stop: asyncio.Event | None = None,
    ) -> int:
        """As :meth:`ct1_client.Client.consume`; ``stop`` is an :class:`asyncio.Event`."""
        loaded = (position or MemoryPosition()).load()
        after = start_after if loaded is None else loaded
        store = Tracked(position or MemoryPosition(), after)
        types = _core.event_types(event_types)
        stop = stop or asyncio.Event()
        backoff = Backoff()
        loop = asyncio.get_running_loop()
        if mode == "poll" and wait <= 0:
            raise ValueError("consume(mode='poll') needs wait > 0: it long-polls for what comes next")
        # a signal the program already handles (asyncio.run's Ctrl-C, aiohttp's run_app) is
        # left to it: loop.add_signal_handler would replace that handler, not chain it
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        installed = []
        for sig in signals:
            if signal.getsignal(sig) not in (signal.SIG_DFL, signal.default_int_handler):
                continue
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
        try:
            while not stop.is_set():
                try:
                    if mode == "poll":
                        await self._poll_once(handle, store, stop, store.last, types, limit, wait)
                    else:
                        await self._stream_once(handle, store, stop, store.last, types, limit, backoff)
                    backoff.reset()
                except _Stopped:
                    break
                except httpx.TransportError as exc:
                    await self._pause(stop, backoff, Unavailable(f"lost ct1-cdc at {self._base}: {exc!r}"))
                except RETRYABLE as exc:
                    await self._pause(stop, backoff, exc)
        except _core.HandlerFailed as failed:
            assert failed.__cause__ is not None
            raise failed.__cause__ from None
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
        return store.last

    async def seed_then_tail(
        self,
        export: str,
        on_row: Callable[[Any], Awaitable[object] | object],
        on_event: AsyncHandler,
        *,
        position: PositionStore,
        event_types: str | Iterable[str] | _core.Default | None = _core.DEFAULT,
        mode: Mode = "sse",
        per_page: int = _core.MAX_PER_PAGE,
        stream: bool = False,
        handle_signals: bool = True,
        stop: asyncio.Event | None = None,
        on_seed_start: Callable[[], Awaitable[object] | object] | None = None,
        **filters: Any,
    ) -> int:
        """As :meth:`ct1_client.Client.seed_then_tail`, awaited."""
        kind = _core.export_kind(export)
        seeded: Overlap | None = None
        backoff = Backoff()
        while position.load() is None:
            if on_seed_start is not None:
                started = on_seed_start()
                if inspect.isawaitable(started):
                    await started
            rows = self.export(export, per_page=per_page, stream=stream, **filters)
            rows.require_position = True
            rows.retries = _core.SEED_PAGE_RETRIES
            try:
                async for row in rows:
                    if stop is not None and stop.is_set():
                        return position.load() or 0
                    result = on_row(row)
                    if inspect.isawaitable(result):
                        await result
            except RETRYABLE as exc:
                delay = backoff.delay(exc)
                log.warning("ct1_client_seed_retrying in=%.1fs error=%s", delay, exc)
                await asyncio.sleep(delay)
                continue
            seeded = rows.overlap()
            assert seeded.resume_event_id is not None  # require_position
            position.save(seeded.resume_event_id)
            log.info("ct1_client_seeded export=%s resume_event_id=%s", export, seeded.resume_event_id)

        async def handle(event: AnyEvent) -> None:
            if seeded is not None and seeded.already_in(event):
                return
            result = on_event(event)
            if inspect.isawaitable(result):
                await result

        return await self.consume(
            handle,
            position=position,
            event_types=_core.tail_types(kind, event_types),
            mode=mode,
            handle_signals=handle_signals,
            stop=stop,
        )

    async def _pause(self, stop: asyncio.Event, backoff: Backoff, error: Ct1Error) -> None:
        delay = backoff.delay(error)
        log.warning("ct1_client_retrying in=%.1fs error=%s", delay, error)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):  # not wait_for: 3.11's can swallow a cancel
                await stop.wait()

    async def _poll_once(
        self,
        handle: AsyncHandler,
        store: PositionStore,
        stop: asyncio.Event,
        after: int,
        types: str | None,
        limit: int,
        wait: float,
    ) -> int:
        body = await _until_stopped(stop, self._get(_core.events_call(after, types, limit, wait), retries=0))
        events, got_to = _core.events_page(body)
        done = await _handle_all(handle, events, store, after, stop)
        if done is not None:
            return done
        if got_to != after:
            store.save(got_to)
        return got_to

    async def _stream_once(
        self,
        handle: AsyncHandler,
        store: PositionStore,
        stop: asyncio.Event,
        after: int,
        types: str | None,
        limit: int,
        backoff: Backoff,
    ) -> int:
        parser = SseParser()
        async with self._open(_core.stream_call(after, types)) as response:
            chunks = response.aiter_bytes()
            while True:
                chunk = await _until_stopped(stop, anext(chunks, None))
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
                for start in range(0, len(events), limit):  # a batch: at most ``limit`` events
                    batch = events[start : start + limit]
                    done = await _handle_all(handle, batch, store, after, stop)
                    after = int(batch[-1].id or after) if done is None else done
                    if done is not None or stop.is_set():
                        return after


async def _until_stopped(stop: asyncio.Event, awaitable: Awaitable[R]) -> R:
    """``awaitable``'s result, or :class:`_Stopped` as soon as ``stop`` is set."""
    if stop.is_set():
        if inspect.iscoroutine(awaitable):
            awaitable.close()
        raise _Stopped
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise _Stopped


async def _handle_all(
    handle: AsyncHandler, events: list[AnyEvent], store: PositionStore, after: int, stop: asyncio.Event
) -> int | None:
    handled = after
    try:
        for event in events:
            try:
                result = handle(event)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # the user's error, not ours: never retried as one
                raise _core.HandlerFailed from exc
            handled = int(event.id or handled)
            if stop.is_set():
                break
    finally:
        if handled != after:
            store.save(handled)
    if events and handled != int(events[-1].id or after):
        return handled
    return None
