"""Alert rules: a late frame (latency budget per model), a throttling GPU, memory near full.

Latency is judged on the frame's time in the server (receive to send), the
part the runtime controls and can measure on one clock. Device alerts hold
from the sample that raised them to the sample that clears them, and flag
every result produced meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgescope.runtime.telemetry.device import DeviceSample
from edgescope.runtime.telemetry.gpu import POWER_THROTTLE, THERMAL_THROTTLE
from edgescope.v1 import stream_pb2

Alert = stream_pb2.Alert
# The key of the budget that applies to every model without its own.
ALL_MODELS = "*"


def kind_label(kind: stream_pb2.Alert.Kind.ValueType) -> str:
    """'latency_budget_exceeded' for KIND_LATENCY_BUDGET_EXCEEDED: the Prometheus label value."""
    return stream_pb2.Alert.Kind.Name(kind).removeprefix("KIND_").lower()


def budget_ms(budgets: Mapping[str, float], model: str) -> float | None:
    return budgets.get(model, budgets.get(ALL_MODELS))


def latency_alert(model: str, server_ms: float, budget: float | None) -> Alert | None:
    if budget is None or server_ms <= budget:
        return None
    return Alert(
        kind=Alert.KIND_LATENCY_BUDGET_EXCEEDED,
        message=f"{model}: {server_ms:.1f} ms in the server, budget {budget:.1f} ms",
        model=model,
        value=server_ms,
        threshold=budget,
    )


def device_alerts(sample: DeviceSample, memory_near_full: float) -> list[Alert]:
    """Alerts in force for this device sample; ``memory_near_full`` is a fraction (0.9 = 90%)."""
    alerts = []
    for gpu in sample.gpus:
        reasons = set(gpu.throttle_reasons)
        if reasons & THERMAL_THROTTLE:
            alerts.append(
                Alert(
                    kind=Alert.KIND_GPU_THERMAL_THROTTLING,
                    message=f"GPU {gpu.index} thermal throttling at {gpu.temperature_c:.0f} C",
                    value=gpu.temperature_c,
                )
            )
        if reasons & POWER_THROTTLE:
            alerts.append(
                Alert(
                    kind=Alert.KIND_GPU_POWER_THROTTLING,
                    message=f"GPU {gpu.index} power capped at {gpu.power_w:.0f} W (limit {gpu.power_limit_w:.0f} W)",
                    value=gpu.power_w,
                    threshold=gpu.power_limit_w,
                )
            )
        if gpu.memory_total_bytes > 0 and gpu.memory_used_bytes / gpu.memory_total_bytes >= memory_near_full:
            fraction = gpu.memory_used_bytes / gpu.memory_total_bytes
            alerts.append(
                Alert(
                    kind=Alert.KIND_GPU_MEMORY_NEAR_FULL,
                    message=f"GPU {gpu.index} memory {fraction:.0%} used",
                    value=fraction,
                    threshold=memory_near_full,
                )
            )
    host = sample.host
    if host.memory_total_bytes > 0 and host.memory_used_bytes / host.memory_total_bytes >= memory_near_full:
        fraction = host.memory_used_bytes / host.memory_total_bytes
        alerts.append(
            Alert(
                kind=Alert.KIND_HOST_MEMORY_NEAR_FULL,
                message=f"host memory {fraction:.0%} used",
                value=fraction,
                threshold=memory_near_full,
            )
        )
    return alerts


def degraded_alert(model: str, reason: str) -> Alert:
    """In force while a model is served by its fallback backend."""
    return Alert(kind=Alert.KIND_MODEL_DEGRADED, model=model, message=f"{model} is degraded: {reason}", value=1.0)
