"""edgescope: deploy PyTorch imaging models to real-time medical devices.

``edgescope.export`` turns a trained model into a bundle (ONNX, manifest,
TensorRT engines); ``edgescope.runtime`` serves bundles to live frame streams
over gRPC. Importing this package loads neither torch nor any GPU library.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgescope")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
