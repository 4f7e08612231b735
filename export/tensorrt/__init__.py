"""TensorRT engines from a bundle's ONNX graph, for TensorRT 10 and 11.

``tensorrt`` is imported only when an engine is built (after ``_trt.require``), so
``import edgescope.export`` works on machines without it.
"""

from edgescope.export.tensorrt.builder import EngineOptions, build_engine

__all__ = ["EngineOptions", "build_engine"]
