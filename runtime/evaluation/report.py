"""One report for every comparison: export's gate, ``edgescope validate``, engine builds, self-tests.

A report names both runners, the precision and the machine, summarises the
metrics (mean and worst frame) against their limits, and says in words why it
failed.
"""

from __future__ import annotations

from datetime import datetime, timezone

from edgescope.runtime.evaluation.limits import GateThresholds
from edgescope.runtime.evaluation.machine import machine_summary
from edgescope.runtime.evaluation.metrics import NO_LIMIT, Comparison, compare_frames
from edgescope.runtime.evaluation.runners import Run, describe
from edgescope.v1 import manifest_pb2


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _limited(metric: manifest_pb2.MetricValue) -> bool:
    return abs(metric.threshold) != NO_LIMIT


def reasons(metrics: list[manifest_pb2.MetricValue], frames: int) -> list[str]:
    """One line per metric that missed its limit."""
    lines = []
    for m in metrics:
        if m.passed:
            continue
        side = "below" if m.higher_is_better else "above"
        if m.per_frame:
            lines.append(
                f"{m.name}: {m.frames_failed} of {frames} frames {side} {m.threshold:g} "
                f"(worst {m.value:.4g}, frame {m.worst_frame})"
            )
        else:
            lines.append(f"{m.name} {m.value:.4g} is {side} the limit {m.threshold:g}")
    return lines


def evaluate(
    reference: Run,
    candidate: Run,
    manifest: manifest_pb2.ModelManifest,
    limits: GateThresholds,
    *,
    data_source: str,
    machine: manifest_pb2.Machine,
    per_frame_only: bool = False,
) -> tuple[manifest_pb2.ValidationReport, Comparison]:
    """``candidate`` against ``reference`` on the same frames: the report and the per-frame comparison."""
    comparison = compare_frames(reference.outputs, candidate.outputs, manifest, limits, per_frame_only=per_frame_only)
    failed = reasons(comparison.metrics, len(candidate.outputs))
    report = manifest_pb2.ValidationReport(
        passed=not failed,
        reference=describe(reference.info),
        candidate=describe(candidate.info),
        samples=len(candidate.outputs),
        data_source=data_source,
        metrics=comparison.metrics,
        reference_runner=reference.info,
        candidate_runner=candidate.info,
        precision=candidate.info.precision,
        machine=machine,
        reasons=failed,
        created_at=now(),
        limits=limits.to_proto(),
    )
    return report, comparison


def format_report(report: manifest_pb2.ValidationReport, title: str = "accuracy gate") -> str:
    lines = [
        f"{title}: {report.candidate} vs {report.reference} on {report.samples} frames from {report.data_source}",
        f"  machine: {machine_summary(report.machine)}",
        f"  raw outputs: every element within {report.limits.max_abs_error:g} + {report.limits.rtol:g} x "
        "max(|reference|, mean |reference|)",
        f"  {'metric':<22}{'value':>12}{'limit':>12}  {'frames':<8}result",
    ]
    for m in report.metrics:
        limit = f"{'>=' if m.higher_is_better else '<='}{m.threshold:g}" if _limited(m) else "-"
        frames = f"{m.frames_failed}/{report.samples}" if m.per_frame and _limited(m) else ""
        verdict = ("pass" if m.passed else "FAIL") if _limited(m) else ""
        lines.append(f"  {m.name:<22}{m.value:>12.6g}{limit:>12}  {frames:<8}{verdict}")
    if report.passed:
        lines.append(f"  {title} PASSED")
    else:
        lines.append(f"  {title} FAILED (written anyway: forced)" if report.forced else f"  {title} FAILED")
        lines.extend(f"    {reason}" for reason in report.reasons)
    return "\n".join(lines)
