"""The evaluator: one comparison of a candidate against a reference, used everywhere.

Export's accuracy gate, ``edgescope validate``, the TensorRT engine build and
the self-test at model load all run two runners over the same preprocessed
frames and judge the candidate by the task's metrics (``metrics``) against
the precision's limits (``limits``). Nothing here imports torch, so the
runtime uses it on devices that only serve.

::

    report = self_test(bundle, session.infer, runner_info)   # at load: golden frames on this device
    report.passed, report.reasons                            # the verdict, and why not

Modules: ``runners`` (what computes outputs: ONNX Runtime exact or
fake-quant or integer kernels, stored outputs, TensorRT, remote),
``metrics``, ``limits``, ``report`` (the ValidationReport), ``golden``
(``golden.npz``), ``selftest``, ``machine`` (CPU, instruction-set level, GPU).
"""

from edgescope.runtime.evaluation.golden import DEFAULT_GOLDEN_FRAMES, GOLDEN_FILE, read_golden
from edgescope.runtime.evaluation.limits import PRECISION_THRESHOLDS, GateThresholds, gate_thresholds
from edgescope.runtime.evaluation.machine import describe_machine
from edgescope.runtime.evaluation.report import evaluate, format_report
from edgescope.runtime.evaluation.runners import (
    FAKE_QUANT,
    INTEGER,
    Run,
    Runner,
    describe,
    onnxruntime_info,
    onnxruntime_runner,
    remote_info,
    run,
    session_options,
    tensorrt_info,
    tensorrt_runner,
)
from edgescope.runtime.evaluation.selftest import format_self_test, onnxruntime_self_test, self_test

__all__ = [
    "DEFAULT_GOLDEN_FRAMES",
    "FAKE_QUANT",
    "GOLDEN_FILE",
    "INTEGER",
    "PRECISION_THRESHOLDS",
    "GateThresholds",
    "Run",
    "Runner",
    "describe",
    "describe_machine",
    "evaluate",
    "format_report",
    "format_self_test",
    "gate_thresholds",
    "onnxruntime_info",
    "onnxruntime_runner",
    "onnxruntime_self_test",
    "read_golden",
    "remote_info",
    "run",
    "self_test",
    "session_options",
    "tensorrt_info",
    "tensorrt_runner",
]
