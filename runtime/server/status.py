"""edgescope errors -> gRPC status codes, in one place."""

from __future__ import annotations

import grpc

from edgescope.errors import (
    BackendError,
    BundleError,
    ConfigError,
    EdgescopeError,
    FrameError,
    MissingDependencyError,
    ModelNotFoundError,
    OverloadError,
)

_CODES: tuple[tuple[type[EdgescopeError], grpc.StatusCode], ...] = (
    (FrameError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (OverloadError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (MissingDependencyError, grpc.StatusCode.FAILED_PRECONDITION),
    (BundleError, grpc.StatusCode.FAILED_PRECONDITION),
    (BackendError, grpc.StatusCode.INTERNAL),
)


def status_code_for(error: BaseException) -> grpc.StatusCode:
    for error_type, code in _CODES:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL
