"""ONNX Runtime backend: the embedded default, on the CPU.

Execution providers are chosen explicitly and never silently swapped: if a
requested provider is missing from the installed onnxruntime, loading fails
and names the providers that are available.

Threads: each session (one per model instance) gets ``intra_op_threads``
(default: the cores divided among the instances, so instances x threads never
exceeds the cores). Its pool never busy-waits between runs, where the cores
belong to decoding, pre/postprocessing and gRPC; whether it busy-waits within
a run is measured per model at load (``spinning="auto"``, see ``ort_threads``)
or set (``"on"``, ``"off"``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import numpy as np
import onnxruntime as ort

from edgescope.bundle import Bundle
from edgescope.errors import BackendError
from edgescope.runtime.backends.base import Feed, Outputs, Session, SessionCapabilities, cpu_cores, dynamic_batch
from edgescope.runtime.backends.ort_threads import SPINNING_CHOICES, Threading, choose_spinning, configure, sample_feed
from edgescope.v1 import manifest_pb2

logger = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)

FAKE_QUANT = manifest_pb2.QUANT_EXECUTION_FAKE_QUANT
INTEGER = manifest_pb2.QUANT_EXECUTION_INTEGER
NO_QUANT = manifest_pb2.QUANT_EXECUTION_NONE


def session_options(
    quant: manifest_pb2.QuantExecution.ValueType, threads: int | None = None, spinning: bool = False
) -> ort.SessionOptions:
    """ONNX Runtime options that run a graph's Q/DQ nodes as ``quant`` says.

    Fake-quant keeps every QuantizeLinear/DequantizeLinear as its own node
    (``session.disable_quant_qdq``) and stops at the basic optimisations
    (constant folding, no layout or kernel fusions), so convolutions and
    matrix products run in float and no integer kernel is ever chosen.
    Otherwise every optimisation is on: Q/DQ groups become QLinearConv and
    the like, whose results depend on the CPU's integer instructions.
    """
    options = ort.SessionOptions()
    configure(options, threads or cpu_cores(), spinning)
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
        threading: Threading | None = None,
    ) -> None:
        super().__init__(manifest)
        self._session = inference
        self._info = info
        # How its intra-op threads run, and why (None: a session made elsewhere, as ONNX Runtime set it).
        self.threading = threading
        self._output_names = [o.name for o in inference.get_outputs()]
        self._provider = inference.get_providers()[0]
        # After a batch, ONNX Runtime's CPU arena hands back what the batch made it grow by: it otherwise keeps
        # the largest batch's buffers for the session's life (30-40 MB for a few streams batched once), while
        # single frames reuse theirs.
        self._shrink_after_batch: ort.RunOptions | None = None
        if self._provider == "CPUExecutionProvider":
            self._shrink_after_batch = ort.RunOptions()
            self._shrink_after_batch.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    @property
    def capabilities(self) -> SessionCapabilities:
        device = "cpu" if self._provider == "CPUExecutionProvider" else self._provider
        # Thread-safe in ONNX Runtime, but each instance gets its own session and thread pool.
        return SessionCapabilities(
            dynamic_batch=dynamic_batch(self.manifest), device_buffers=False, device=device, max_concurrency=1
        )

    def _infer_impl(self, feed: Feed) -> Outputs:
        try:
            batched = any(np.ndim(value) > 0 and np.shape(value)[0] > 1 for value in feed.values())
            values = self._session.run(self._output_names, dict(feed), self._shrink_after_batch if batched else None)
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
        spinning: str = "auto",
    ) -> None:
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendError(
                f"onnxruntime execution provider(s) {', '.join(missing)} are not in this "
                f"onnxruntime build (available: {', '.join(available)}); install the matching "
                "onnxruntime package (e.g. onnxruntime-gpu) or choose an available provider"
            )
        if spinning not in SPINNING_CHOICES:
            raise BackendError(f"intra-op spinning must be one of {', '.join(SPINNING_CHOICES)}, not {spinning!r}")
        self.providers = list(providers)
        self.intra_op_threads = intra_op_threads or max(1, cpu_cores() // max(1, instances))
        # How an INT8 (Q/DQ) graph runs: this CPU's integer kernels (fast, and trusted only once the
        # load self-test shows they reproduce the gated numbers), or fake-quant (float, the same everywhere).
        self.int8_execution = int8_execution
        self.spinning = spinning
        # Measured once per graph: the instances of a model (and its reloads) reuse the first one's choice.
        self._measured: dict[str, Threading] = {}
        self._measuring = threading.Lock()

    def load(self, bundle: Bundle) -> OnnxRuntimeSession:
        precision = bundle.manifest.precision
        mode = self.int8_execution if precision == manifest_pb2.PRECISION_INT8 else NO_QUANT
        # From the bytes that were just checked against the manifest, not the path again.
        model = bundle.onnx_bytes()

        def open_session(spinning: bool) -> ort.InferenceSession:
            options = session_options(mode, self.intra_op_threads, spinning)
            try:
                return ort.InferenceSession(model, sess_options=options, providers=self.providers)
            except Exception as exc:
                raise BackendError(f"onnxruntime cannot load {bundle.onnx_path}: {exc}") from exc

        inference, chosen = self._open(bundle, open_session)
        info = onnxruntime_info(precision, mode, inference.get_providers(), bundle.onnx_sha256)
        return OnnxRuntimeSession(bundle.manifest, inference, info, chosen)

    def _open(
        self, bundle: Bundle, open_session: Callable[[bool], ort.InferenceSession]
    ) -> tuple[ort.InferenceSession, Threading]:
        threads = self.intra_op_threads
        if self.spinning != "auto":
            return open_session(self.spinning == "on"), Threading(threads, self.spinning == "on", "as configured")
        if self.providers != ["CPUExecutionProvider"]:
            # Another provider runs the model's operators; the CPU pool only glues them together.
            return open_session(False), Threading(threads, False, f"not measured: {self.providers[0]} runs the model")
        with self._measuring:
            known = self._measured.get(bundle.onnx_sha256)
            if known is not None:
                return open_session(known.spinning), known
            feed = sample_feed(bundle.manifest)
            if feed is None:
                chosen = Threading(threads, False, "not measured: the input has dynamic dimensions")
                inference = open_session(False)
            else:
                inference, chosen = choose_spinning(open_session, feed, threads)
            self._measured[bundle.onnx_sha256] = chosen
        logger.info("%s on onnxruntime: %s", bundle.manifest.name, chosen.describe())
        return inference, chosen
