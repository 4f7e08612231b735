"""Who may call what: tokens, client certificates, roles, and the guard around every call.

Roles. ``read`` streams frames and reads results, models and telemetry;
``admin`` also changes what is served. ``admin`` implies ``read``.

=====================  ==========================================================
role                   calls
=====================  ==========================================================
none (public)          grpc.health.v1.Health Check and Watch: orchestrators
                       probe liveness without credentials; it tells only
                       SERVING or NOT_SERVING
read                   Health List (it names every service);
                       StreamService Stream, Infer, Subscribe, ListModels,
                       GetModel, Register/UnregisterSharedMemory (a region is
                       usable only by its registrant, and capped per caller);
                       TelemetryService Telemetry; KServe ServerLive/Ready,
                       ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
                       ModelStatistics, RepositoryIndex, ModelInfer,
                       ModelStreamInfer; server reflection
admin                  StreamService LoadModel, UnloadModel; KServe
                       RepositoryModelLoad/Unload, shared-memory registration,
                       trace and log settings; any call not listed here
=====================  ==========================================================

Authentication. With tokens configured (``--token-file``: lines ``ROLE
TOKEN``; or ``EDGESCOPE_READ_TOKEN`` / ``EDGESCOPE_ADMIN_TOKEN``), every call
but health Check/Watch needs ``authorization: Bearer TOKEN``: none or an unknown one gets
UNAUTHENTICATED, a known token without the call's role PERMISSION_DENIED.
Tokens are compared as sha256 digests with ``hmac.compare_digest``, against
every configured token, so timing tells nothing. With ``--tls-client-ca``,
the TLS handshake already refused clients without a certificate from that
CA; the certificate's subject names the caller. Without tokens every caller
that can connect holds both roles: on loopback (the default) that is the
local host, with mutual TLS the holders of a client certificate.

The guard (``AuthInterceptor``) also makes every call end with a documented
status: a request that does not parse is INVALID_ARGUMENT (not UNKNOWN), an
``EdgescopeError`` escaping a handler gets its mapped code, anything else
INTERNAL, and status messages are cut to a bounded length.

The caller of the call being served is ``current_caller()`` (a context
variable, set per call, carried into worker threads by ``CallerExecutor``):
shared-memory regions belong to the caller that registered them.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import inspect
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, ParamSpec, TypeVar

import grpc

from edgescope.errors import AuthenticationError, ConfigError, EdgescopeError, FrameError, PermissionDeniedError
from edgescope.runtime.server.grpc_status import shorten, status_code_for

logger = logging.getLogger(__name__)

READ = "read"
ADMIN = "admin"
PUBLIC = "public"
ROLES = (READ, ADMIN)
READ_TOKEN_ENV = "EDGESCOPE_READ_TOKEN"
ADMIN_TOKEN_ENV = "EDGESCOPE_ADMIN_TOKEN"
# Long enough that guessing is hopeless (e.g. `openssl rand -hex 32`).
MIN_TOKEN_CHARS = 16

_STREAM = "/edgescope.v1.StreamService/"
_KSERVE = "/inference.GRPCInferenceService/"
METHOD_ROLES: dict[str, str] = {
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.health.v1.Health/List": READ,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": READ,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": READ,
    "/edgescope.v1.TelemetryService/Telemetry": READ,
    **{
        _STREAM + name: READ
        for name in (
            "Stream",
            "Infer",
            "Subscribe",
            "ListModels",
            "GetModel",
            "RegisterSharedMemory",
            "UnregisterSharedMemory",
        )
    },
    _STREAM + "LoadModel": ADMIN,
    _STREAM + "UnloadModel": ADMIN,
    **{
        _KSERVE + name: READ
        for name in (
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelConfig",
            "ModelStatistics",
            "RepositoryIndex",
            "ModelInfer",
            "ModelStreamInfer",
            "SystemSharedMemoryStatus",
            "CudaSharedMemoryStatus",
        )
    },
    **{
        _KSERVE + name: ADMIN
        for name in (
            "RepositoryModelLoad",
            "RepositoryModelUnload",
            "SystemSharedMemoryRegister",
            "SystemSharedMemoryUnregister",
            "CudaSharedMemoryRegister",
            "CudaSharedMemoryUnregister",
            "TraceSetting",
            "LogSettings",
        )
    },
}


def role_for(method: str) -> str:
    """The role a method needs; a method nobody listed needs admin (fail closed)."""
    return METHOD_ROLES.get(method, ADMIN)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the connection (``peer``), the credential (``identity``) and its roles."""

    peer: str
    identity: str
    roles: frozenset[str]

    @property
    def owner(self) -> str:
        """What owns a resource this caller creates: the credential on this connection."""
        return f"{self.identity}@{self.peer}"


_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("edgescope_caller", default=None)


def current_caller() -> Caller | None:
    """The caller of the call being served here, or None outside a call."""
    return _CALLER.get()


def current_client() -> str:
    """Who a model's time is shared out to: the credential and the host it calls from.

    Every connection of one credential from one host is one client, so opening more
    calls or connections does not buy a bigger share; the server's own work (captures,
    warm-up) is ``server``.
    """
    caller = _CALLER.get()
    if caller is None:
        return "server"
    host = caller.peer.rsplit(":", 1)[0] if caller.peer.count(":") > 1 else caller.peer
    return f"{caller.identity}@{host}"


_P = ParamSpec("_P")
_T = TypeVar("_T")


class CallerExecutor(ThreadPoolExecutor):
    """A thread pool that runs each task in a copy of its submitter's context (as ``asyncio.to_thread`` does).

    ``loop.run_in_executor`` does not carry context variables; with this pool,
    work a call hands to a thread still knows the call's caller.
    """

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        context = contextvars.copy_context()
        return super().submit(context.run, fn, *args, **kwargs)  # type: ignore[arg-type]


class TokenTable:
    """Configured tokens as (sha256 digest, role); the tokens themselves are not kept."""

    def __init__(self, entries: list[tuple[str, str]]) -> None:
        for role, token in entries:
            if role not in ROLES:
                raise ConfigError(f"token role {role[:20]!r} is neither 'read' nor 'admin'")
            if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
                raise ConfigError(
                    f"a {role} token must be at least {MIN_TOKEN_CHARS} printable ASCII characters without spaces "
                    "(e.g. the output of `openssl rand -hex 32`)"
                )
        self._entries = [(token_digest(token), role) for role, token in entries]

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, token_file: Path | None, environ: Mapping[str, str] = os.environ) -> TokenTable:
        """Tokens from ``--token-file`` (lines ``ROLE TOKEN``; ``#`` comments) and the two variables."""
        entries: list[tuple[str, str]] = []
        if token_file is not None:
            try:
                text = token_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read --token-file {token_file}: {exc}") from exc
            for number, line in enumerate(text.splitlines(), start=1):
                words = line.split()
                if not words or words[0].startswith("#"):
                    continue
                if len(words) != 2:
                    raise ConfigError(f"{token_file}:{number}: expected 'ROLE TOKEN' (role read or admin)")
                entries.append((words[0], words[1]))
        for variable, role in ((READ_TOKEN_ENV, READ), (ADMIN_TOKEN_ENV, ADMIN)):
            if environ.get(variable, "").strip():
                entries.append((role, environ[variable].strip()))
        return cls(entries)

    def role_of(self, token: str) -> str | None:
        """The role of a token, checking every entry in constant time; None when unknown."""
        return self.role_of_digest(token_digest(token))

    def role_of_digest(self, digest: bytes) -> str | None:
        """``role_of`` for a token's ``token_digest``."""
        found: str | None = None
        for expected, role in self._entries:
            if hmac.compare_digest(digest, expected) and found != ADMIN:
                found = role
        return found


def token_digest(token: str) -> bytes:
    """What a token table holds and compares (tokens are never kept or logged as given)."""
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


def _roles(role: str) -> frozenset[str]:
    return frozenset(ROLES) if role == ADMIN else frozenset((READ,))


def _certificate_name(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    auth = context.auth_context()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        values = list(auth.get(key, ()))
        if values:
            return values[0].decode("utf-8", "replace")
    return None


@dataclass(frozen=True, slots=True)
class Authenticator:
    """Turns a call's metadata and connection into a ``Caller``, or refuses it."""

    tokens: TokenTable
    mutual_tls: bool = False

    def caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        peer = context.peer() or "unknown"
        certificate = _certificate_name(context) if self.mutual_tls else None
        who = f"cert:{certificate}" if certificate else "anonymous"
        if not len(self.tokens):
            return Caller(peer, who, frozenset(ROLES))
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("this server needs a token: send 'authorization: Bearer TOKEN'")
        digest = token_digest(token)
        role = self.tokens.role_of_digest(digest)
        if role is None:
            raise AuthenticationError("the token is not valid on this server")
        name = f"token:{digest.hex()[:12]}"
        return Caller(peer, f"{who}/{name}" if certificate else name, _roles(role))

    def admit(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> Caller | None:
        role = role_for(method)
        if role == PUBLIC:
            return None
        caller = self.caller(context)
        if role not in caller.roles:
            raise PermissionDeniedError(f"{method.rsplit('/', 1)[-1]} needs the {role} role; this token has read only")
        return caller


# -- the guard around every handler ----------------------------------------------------------------


class _Unparseable:
    """Stands in for a request message that did not deserialize."""


_UNPARSEABLE = _Unparseable()


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # protobuf's DecodeError and friends
            return _UNPARSEABLE

    return deserialize


class _BoundedContext:
    """The servicer context, with status messages cut to a bounded length."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        await self._context.abort(code, shorten(details), trailing_metadata)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    def set_details(self, details: str) -> None:
        self._context.set_details(shorten(details))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _fail(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> NoReturn:
    if isinstance(exc, EdgescopeError):
        await context.abort(status_code_for(exc), shorten(str(exc)))
    logger.error("call failed unexpectedly", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


async def _requests(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    # Raised to the handler, not aborted here: a stream answers the requests it read before ending non-OK.
    async for request in requests:
        if request is _UNPARSEABLE:
            raise FrameError("a request message could not be parsed")
        yield request


Admit = Callable[[grpc.aio.ServicerContext[Any, Any]], Caller | None]
_Abort = grpc.aio.AbortError


def _guard(handler: grpc.RpcMethodHandler[Any, Any], admit: Admit) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler, behind authentication, request checks and bounded errors."""

    async def enter(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            _CALLER.set(admit(context))
        except EdgescopeError as exc:
            await context.abort(status_code_for(exc), str(exc))
        if request is _UNPARSEABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request message could not be parsed")
        if handler.request_streaming:
            return _requests(request)
        return request

    inner: Callable[..., Any] = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream  # type: ignore[assignment]
    )

    async def unary_response(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        argument = await enter(request, context)
        try:
            return await inner(argument, _BoundedContext(context))
        except (_Abort, grpc.aio.UsageError):
            raise
        except Exception as exc:
            await _fail(context, exc)

    async def streamed_response(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        argument = await enter(request, context)
        try:
            async for response in inner(argument, _BoundedContext(context)):
                yield response
        except (_Abort, grpc.aio.UsageError):
            raise
        except Exception as exc:
            await _fail(context, exc)

    async def written_response(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # A streaming handler that writes through context.write (grpc's health Watch).
        argument = await enter(request, context)
        try:
            await inner(argument, _BoundedContext(context))
        except (_Abort, grpc.aio.UsageError):
            raise
        except Exception as exc:
            await _fail(context, exc)

    deserializer = _lenient(handler.request_deserializer)
    serializer = handler.response_serializer
    if not handler.response_streaming:
        behavior: Callable[..., Awaitable[Any]] = unary_response
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(behavior, deserializer, serializer)
        return grpc.unary_unary_rpc_method_handler(behavior, deserializer, serializer)
    streaming: Callable[..., Any] = streamed_response if inspect.isasyncgenfunction(inner) else written_response
    if handler.request_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, deserializer, serializer)
    return grpc.unary_stream_rpc_method_handler(streaming, deserializer, serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Guards every method the server serves (see the module docstring)."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        # None for a method nobody serves (grpc then answers UNIMPLEMENTED); the stubs leave that out.
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if not isinstance(handler, grpc.RpcMethodHandler):
            return handler  # type: ignore[return-value]
        method = handler_call_details.method

        def admit(context: grpc.aio.ServicerContext[Any, Any]) -> Caller | None:
            return self._authenticator.admit(context, method)

        return _guard(handler, admit)
