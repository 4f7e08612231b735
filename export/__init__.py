"""Export: PyTorch model -> validated bundle (ONNX + manifest).

torch is imported only when an export runs, so ``import edgescope.export``
works on devices that only serve models.
"""

from edgescope.export.api import ExportRequest, export_model

__all__ = ["ExportRequest", "export_model"]
