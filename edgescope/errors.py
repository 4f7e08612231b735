"""The one exception hierarchy of edgescope.

::

    EdgescopeError
    ├── ConfigError              bad configuration or command-line arguments
    ├── MissingDependencyError   an optional package or capability is absent
    ├── BundleError              a bundle is missing, malformed or altered
    ├── ExportError              a model could not be turned into a bundle
    │   └── ValidationFailedError    the accuracy gate refused the bundle
    ├── SourceError              a frame source cannot be opened or read
    ├── FrameError               one frame is malformed (the stream goes on)
    ├── ModelNotFoundError       a request names a model that is not loaded
    ├── SelfTestFailedError      a model did not reproduce its golden frames on this device
    ├── OverloadError            the server has no room for the request now
    ├── DeadlineExpiredError     a request's deadline passed before it could be answered
    ├── BackendError             an inference backend failed
    ├── AuthenticationError      a caller's credentials are missing or wrong
    ├── PermissionDeniedError    a caller lacks the role a call needs
    └── QuotaExceededError       a caller holds as much of a shared resource as it may

Errors are translated at boundaries (``raise ... from exc``); the runtime maps
them to gRPC status codes in one place (``edgescope.runtime.server.grpc_status``).
"""

from __future__ import annotations


class EdgescopeError(Exception):
    """Base class of every error edgescope raises on purpose."""


class ConfigError(EdgescopeError):
    """Configuration or command-line arguments are invalid."""


class MissingDependencyError(EdgescopeError):
    """An optional dependency is not installed; the message says how to get it."""

    def __init__(self, what: str, install_hint: str) -> None:
        super().__init__(f"{what} is not available: {install_hint}")
        self.what = what
        self.install_hint = install_hint


class BundleError(EdgescopeError):
    """A model bundle is missing, malformed, or does not match its manifest."""


class ExportError(EdgescopeError):
    """A model could not be exported to a bundle."""


class ValidationFailedError(ExportError):
    """The exported model does not reproduce the original within the thresholds."""


class SourceError(EdgescopeError):
    """A frame source cannot be opened or read."""


class FrameError(EdgescopeError):
    """One frame is malformed; only that frame fails."""


class ModelNotFoundError(EdgescopeError):
    """A request names a model the server has not loaded."""


class SelfTestFailedError(EdgescopeError):
    """A model did not reproduce its golden frames on this device, so it is not served."""


class OverloadError(EdgescopeError):
    """The server has no room for this request now; try again later or elsewhere."""


class DeadlineExpiredError(EdgescopeError):
    """A request's deadline passed before it could be answered; it was not run, or its result was discarded."""


class BackendError(EdgescopeError):
    """An inference backend failed to load a model or to run it."""


class AuthenticationError(EdgescopeError):
    """A caller gave no credentials, or credentials the server does not accept."""


class PermissionDeniedError(EdgescopeError):
    """A caller is known but lacks the role (or ownership) a call needs."""


class QuotaExceededError(EdgescopeError):
    """A caller already holds as much of a shared resource as one caller may."""
