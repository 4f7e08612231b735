"""The check that the installed ``tensorrt`` is one edgescope supports.

Code that touches TensorRT calls ``require()`` and then imports the module as
``trt`` itself (``import tensorrt as trt``): mypy types a module only where it
is imported, so every ``trt.X.Y`` is checked against the stubs of each
supported major version (tests/test_tensorrt_types.py), and
tests/test_tensorrt_api.py finds those names and checks them against the real
bindings.
"""

from __future__ import annotations

from edgescope.engines import TENSORRT_HINT
from edgescope.errors import MissingDependencyError

SUPPORTED_MAJORS = (10, 11)


def require() -> int:
    """The installed TensorRT's major version; MissingDependencyError when it is absent or unsupported."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError("TensorRT", TENSORRT_HINT) from exc
    major = int(str(tensorrt.__version__).split(".", 1)[0])
    if major not in SUPPORTED_MAJORS:
        raise MissingDependencyError(
            f"TensorRT {'/'.join(map(str, SUPPORTED_MAJORS))}.x",
            f"found TensorRT {tensorrt.__version__}; {TENSORRT_HINT}",
        )
    return major
