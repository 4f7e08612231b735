"""ONNX Runtime with a hook the tests control, called on the instance thread before every inference
(to hold a model, slow it down or make it hang)."""

from __future__ import annotations

from collections.abc import Callable

from edgescope.bundle import Bundle
from edgescope.runtime.backends.base import Feed, Outputs, Session, SessionCapabilities
from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend


class HookedSession(Session):
    """The real session, with ``before`` called ahead of each inference."""

    backend_name = "hooked"

    def __init__(self, inner: Session, before: Callable[[], object]) -> None:
        super().__init__(inner.manifest)
        self._inner, self._before = inner, before

    @property
    def capabilities(self) -> SessionCapabilities:
        return self._inner.capabilities

    def _infer_impl(self, feed: Feed) -> Outputs:
        self._before()
        return self._inner.infer(feed)

    def _close_impl(self) -> None:
        self._inner.close()


class HookedBackend(OnnxRuntimeBackend):
    """One intra-op thread, never spinning; each session it loads calls ``before`` ahead of each inference."""

    def __init__(self, before: Callable[[], object]) -> None:
        super().__init__(intra_op_threads=1, spinning="off")
        self._before = before

    def load(self, bundle: Bundle) -> HookedSession:  # type: ignore[override]
        return HookedSession(super().load(bundle), self._before)
