"""edgescope errors -> gRPC status codes, and the status messages that carry them, in one place."""

from __future__ import annotations

import grpc

from edgescope.errors import (
    AuthenticationError,
    BackendError,
    BundleError,
    ConfigError,
    DeadlineExpiredError,
    EdgescopeError,
    FrameError,
    MissingDependencyError,
    ModelNotFoundError,
    OverloadError,
    PermissionDeniedError,
    QuotaExceededError,
    SelfTestFailedError,
    SourceError,
)

_CODES: tuple[tuple[type[EdgescopeError], grpc.StatusCode], ...] = (
    (FrameError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (OverloadError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExpiredError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (SelfTestFailedError, grpc.StatusCode.FAILED_PRECONDITION),
    (MissingDependencyError, grpc.StatusCode.FAILED_PRECONDITION),
    (BundleError, grpc.StatusCode.FAILED_PRECONDITION),
    (BackendError, grpc.StatusCode.INTERNAL),
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (QuotaExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # A source the server reads (a capture) is down: try again later.
    (SourceError, grpc.StatusCode.UNAVAILABLE),
)

# Status details travel in an HTTP/2 trailer; a client-sized name echoed into
# one could outgrow the header limit and turn the real code into another.
MAX_STATUS_CHARS = 1024
# Names a caller chose (models, regions, captures) are cut to this when echoed.
MAX_ECHOED_NAME_CHARS = 64


def status_code_for(error: BaseException) -> grpc.StatusCode:
    for error_type, code in _CODES:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def shorten(text: str, limit: int = MAX_STATUS_CHARS) -> str:
    """``text`` cut to ``limit`` characters, marked as cut."""
    if len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def echo(name: str) -> str:
    """A caller-chosen name, quoted and cut, for use inside a message."""
    return repr(shorten(name, MAX_ECHOED_NAME_CHARS))
