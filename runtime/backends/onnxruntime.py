"""ONNX Runtime backend: the embedded default, on the CPU.

Execution providers are chosen explicitly and never silently swapped: if a
requested provider is missing from the installed onnxruntime, loading fails
and names the providers that are available.

Threads: each session (one per model instance) gets ``intra_op_threads``
(default: the cores divided among the instances, so instances x threads never
exceeds the cores), and its pool does not spin while idle: ONNX Runtime's
default busy-wait would take the cores that decoding, pre/postprocessing and
gRPC need between frames. ``spinning=True`` restores the busy-wait, for a
machine whose cores serve inference alone (a few per cent faster per frame).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from edgescope.bundle import Bundle
from edgescope.errors import BackendError
from edgescope.runtime.backends.base import Feed, Outputs, Session, SessionCapabilities, cpu_cores, dynamic_batch
from edgescope.v1 import manifest_pb2

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)

FAKE_QUANT = manifest_pb2.QUANT_EXECUTION_FAKE_QUANT
INTEGER = manifest_pb2.QUANT_EXECUTION_INTEGER
NO_QUANT = manifest_pb2.QUANT_EXECUTION_NONE


def session_options(quant: manifest_pb2.QuantExecution.ValueType, threads: int | None = None) -> ort.SessionOptions:
    """ONNX Runtime options that run a graph's Q/DQ nodes as ``quant`` says.

    Fake-quant keeps every QuantizeLinear/DequantizeLinear as its own node
    (``session.disable_quant_qdq``) and stops at the basic optimisations
    (constant folding, no layout or kernel fusions), so convolutions and
    matrix products run in float and no integer kernel is ever chosen.
    Otherwise every optimisation is on: Q/DQ groups become QLinearConv and
    the like, whose results depend on the CPU's integer instructions.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_cores()
    options.inter_op_num_threads = 1
    if quant == FAKE_QUANT:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    else:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def onnxruntime_info(
    precision: manifest_pb2.Precision.ValueType,
    quant: manifest_pb2.QuantExecution.ValueType,
    providers: Sequence[str],
    artifact_sha256: str,
) -> manifest_pb2.RunnerInfo:
    cpu_only = list(providers) == ["CPUExecutionProvider"]
    return manifest_pb2.RunnerInfo(
        kind="onnxruntime",
        version=ort.__version__,
        device="cpu" if cpu_only else providers[0].removesuffix("ExecutionProvider").lower(),
        precision=precision,
        quant_execution=quant,
        detail="" if cpu_only else ",".join(providers),
        artifact_sha256=artifact_sha256,
    )


class OnnxRuntimeSession(Session):
    backend_name = "onnxruntime"

    def __init__(
        self,
        manifest: manifest_pb2.ModelManifest,
        inference: ort.InferenceSession,
        info: manifest_pb2.RunnerInfo,
    ) -> None:
        super().__init__(manifest)
        self._session = inference
        self._info = info
        self._output_names = [o.name for o in inference.get_outputs()]
        self._provider = inference.get_providers()[0]

    @property
    def capabilities(self) -> SessionCapabilities:
        device = "cpu" if self._provider == "CPUExecutionProvider" else self._provider
        # Thread-safe in ONNX Runtime, but each instance gets its own session and thread pool.
        return SessionCapabilities(
            dynamic_batch=dynamic_batch(self.manifest), device_buffers=False, device=device, max_concurrency=1
        )

    def _infer_impl(self, feed: Feed) -> Outputs:
        try:
            values = self._session.run(self._output_names, dict(feed))
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise BackendError(f"onnxruntime failed on {self.manifest.name}: {exc}") from exc
        return {name: np.asarray(v) for name, v in zip(self._output_names, values, strict=True)}

    def describe(self) -> manifest_pb2.RunnerInfo:
        return self._info

    def _close_impl(self) -> None:
        # onnxruntime frees the session with the last reference.
        del self._session


class OnnxRuntimeBackend:
    name = "onnxruntime"
    default_instances = 1

    def __init__(
        self,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        intra_op_threads: int | None = None,
        *,
        instances: int = 1,
        int8_execution: manifest_pb2.QuantExecution.ValueType = INTEGER,
        spinning: bool = False,
    ) -> None:
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendError(
                f"onnxruntime execution provider(s) {', '.join(missing)} are not in this "
                f"onnxruntime build (available: {', '.join(available)}); install the matching "
                "onnxruntime package (e.g. onnxruntime-gpu) or choose an available provider"
            )
        self.providers = list(providers)
        self.intra_op_threads = intra_op_threads or max(1, cpu_cores() // max(1, instances))
        # How an INT8 (Q/DQ) graph runs: this CPU's integer kernels (fast, and trusted only once the
        # load self-test shows they reproduce the gated numbers), or fake-quant (float, the same everywhere).
        self.int8_execution = int8_execution
        self.spinning = spinning

    def load(self, bundle: Bundle) -> OnnxRuntimeSession:
        precision = bundle.manifest.precision
        mode = self.int8_execution if precision == manifest_pb2.PRECISION_INT8 else NO_QUANT
        options = session_options(mode, self.intra_op_threads)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        # From the bytes that were just checked against the manifest, not the path again.
        model = bundle.onnx_bytes()
        try:
            inference = ort.InferenceSession(model, sess_options=options, providers=self.providers)
        except Exception as exc:
            raise BackendError(f"onnxruntime cannot load {bundle.onnx_path}: {exc}") from exc
        info = onnxruntime_info(precision, mode, inference.get_providers(), bundle.onnx_sha256)
        return OnnxRuntimeSession(bundle.manifest, inference, info)
