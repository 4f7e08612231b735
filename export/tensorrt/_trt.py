"""The one place that imports ``tensorrt``.

Code that touches TensorRT names the module ``trt`` (``trt = load()``), so
tests/test_tensorrt_api.py can find every ``trt.X.Y`` it uses and check it
against the real bindings of each supported major version.
"""

from __future__ import annotations

from typing import Any

from edgescope.engines import TENSORRT_HINT
from edgescope.errors import MissingDependencyError

SUPPORTED_MAJORS = (10, 11)


def load() -> Any:
    """The ``tensorrt`` module; MissingDependencyError when it is absent or of an unsupported major version."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError("TensorRT", TENSORRT_HINT) from exc
    if major(tensorrt) not in SUPPORTED_MAJORS:
        raise MissingDependencyError(
            f"TensorRT {'/'.join(map(str, SUPPORTED_MAJORS))}.x",
            f"found TensorRT {tensorrt.__version__}; {TENSORRT_HINT}",
        )
    return tensorrt


def major(trt: Any) -> int:
    return int(str(trt.__version__).split(".", 1)[0])
