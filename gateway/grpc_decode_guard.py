"""`DecodeGuard`: a gRPC request message that does not decode is answered ``INVALID_ARGUMENT``,
for every method of every service the server serves.

Without it, ``grpc.aio`` calls the method's request deserializer (protobuf ``FromString``)
itself; a ``DecodeError`` escapes to its generic handler, which logs a full traceback and
answers ``UNKNOWN`` ("Unexpected <class 'google.protobuf.message.DecodeError'>"): a client bug
looks like a server error, and anyone who can reach the port can fill the log at line rate.

How: a server interceptor, so it covers every method handler the server resolves (registered
with ``add_*Servicer_to_server`` or generic, present and future services alike) with no code per
service. For each method it returns a handler whose

- request deserializer never raises: bytes that do not decode become an `Undecodable` marker;
- behaviour answers a marker with ``context.abort(INVALID_ARGUMENT, "<method>: the request
  message does not decode (...)")``: for a unary request before the servicer runs; in a request
  stream the servicer sees the end of the stream instead of the marker (the request iterator
  ends, ``context.read()`` of the reader/writer API returns ``grpc.aio.EOF``), finishes what
  it has, and the call then ends with that status: the client gets the answers to the messages
  before the undecodable one, then ``INVALID_ARGUMENT``, never an answer after it. ``abort``
  raises grpc's own ``AbortError``, which grpc ends the call with quietly (no log);
- report goes to `gateway.malformed.MalformedInput` (counter + one line per peer per interval).

The wrapped behaviour keeps the kind grpc dispatches on (coroutine function or async generator
function). The gateway's ``grpc.aio`` server has no thread pool for plain (synchronous)
behaviours, so none is served; one would be left unguarded, with a warning at its first call.
Wrapped handlers are cached per method.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc

from gateway.malformed import MalformedInput

log = logging.getLogger(__name__)

Behavior = Callable[..., Any]
Deserializer = Callable[[bytes], Any]
if TYPE_CHECKING:  # generic in the type stubs only
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]


class Undecodable:
    """What the guarded deserializer returns for bytes that do not decode.

    Attributes:
        error: the deserializer's exception, as ``"<type>: <message>"``.
    """

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _guarded(deserializer: Deserializer) -> Deserializer:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any failure to decode is the client's bytes
            return Undecodable(f"{type(exc).__name__}: {exc}")

    return deserialize


class _StreamGuard:
    """One request-streaming call: its requests and its context's ``read()`` go through here;
    the first `Undecodable` ends the stream for the servicer, is reported at once (``on_bad``)
    and kept in ``bad`` for the status at the end."""

    def __init__(
        self,
        requests: AsyncIterator[Any],
        context: Context,
        on_bad: Callable[[Undecodable, Context], None],
    ) -> None:
        self._requests = requests
        self._context = context
        self._on_bad = on_bad
        self.bad: Undecodable | None = None

    def _passes(self, message: Any) -> bool:
        if isinstance(message, Undecodable):
            self.bad = message
            self._on_bad(message, self._context)
        return self.bad is None

    async def requests(self) -> AsyncIterator[Any]:
        """The request iterator the servicer gets."""
        async for message in self._requests:
            if not self._passes(message):
                return
            yield message

    async def read(self) -> Any:
        """``context.read()`` for the servicer (reader/writer API)."""
        if self.bad is not None:
            return grpc.aio.EOF
        message = await self._context.read()
        return message if self._passes(message) else grpc.aio.EOF


class _StreamContext:
    """The servicer's context of a request-streaming call: ``read()`` from its `_StreamGuard`,
    everything else the call's own context."""

    def __init__(self, context: Context, guard: _StreamGuard) -> None:
        self._context = context
        self.read = guard.read

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class DecodeGuard(grpc.aio.ServerInterceptor):
    """The server interceptor (module doc).

    Args:
        malformed: where undecodable requests are counted and logged.
    """

    def __init__(self, malformed: MalformedInput) -> None:
        self.malformed = malformed
        self._cache: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler  # unknown method (UNIMPLEMENTED), or raw bytes that cannot fail
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = self._guard(method, handler, handler.request_deserializer)
        self._cache[method] = (handler, guarded)
        return guarded

    def _report(self, method: str, bad: Undecodable, context: Context) -> None:
        self.malformed.report("grpc", method, context.peer(), bad.error)

    async def _abort(self, method: str, bad: Undecodable, context: Context) -> None:
        """End the call with INVALID_ARGUMENT naming the method (raises grpc's AbortError)."""
        detail = f"{method}: the request message does not decode ({bad.error})"
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail[:300])

    def _guard(self, method: str, handler: Handler, deserializer: Deserializer) -> Handler:
        behavior = cast(
            Behavior,
            handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream,
        )
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            log.warning("gRPC method %s is synchronous: its undecodable requests are not guarded", method)
            return handler
        wrap = self._wrap_stream_request if handler.request_streaming else self._wrap_unary_request
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return make(
            wrap(method, behavior),
            request_deserializer=_guarded(deserializer),
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary_request(self, method: str, behavior: Behavior) -> Behavior:
        """``behavior(request, context)``, a marker answered before it runs."""

        async def reject(request: Any, context: Context) -> None:
            if isinstance(request, Undecodable):
                self._report(method, request, context)
                await self._abort(method, request, context)

        if inspect.isasyncgenfunction(behavior):

            async def unary_request_stream(
                request: Any, context: Context
            ) -> AsyncIterator[Any]:
                await reject(request, context)
                async for response in behavior(request, context):
                    yield response

            return unary_request_stream

        async def unary_request(request: Any, context: Context) -> Any:
            await reject(request, context)
            return await behavior(request, context)

        return unary_request

    def _wrap_stream_request(self, method: str, behavior: Behavior) -> Behavior:
        """``behavior(request_iterator, context)``: a marker ends the stream for it; once it
        has finished, the call ends with INVALID_ARGUMENT unless it ended the call itself
        (module doc)."""

        def guard(requests: AsyncIterator[Any], context: Context) -> _StreamGuard:
            return _StreamGuard(requests, context, lambda bad, ctx: self._report(method, bad, ctx))

        async def finish(guarded: _StreamGuard, context: Context) -> None:
            if guarded.bad is not None and not context.done():
                await self._abort(method, guarded.bad, context)

        if inspect.isasyncgenfunction(behavior):

            async def stream_request_stream(
                requests: AsyncIterator[Any], context: Context
            ) -> AsyncIterator[Any]:
                guarded = guard(requests, context)
                async for response in behavior(guarded.requests(), _StreamContext(context, guarded)):
                    yield response
                await finish(guarded, context)

            return stream_request_stream

        async def stream_request(requests: AsyncIterator[Any], context: Context) -> Any:
            guarded = guard(requests, context)
            result = await behavior(guarded.requests(), _StreamContext(context, guarded))
            await finish(guarded, context)
            return result

        return stream_request
