from __future__ import annotations

import time

import pytest
from prometheus_client import generate_latest

from edgescope.runtime.telemetry.alerts import kind_label
from edgescope.runtime.telemetry.device import DeviceSample, HostSample
from edgescope.runtime.telemetry.gpu import GpuSample
from edgescope.runtime.telemetry.metrics import UNKNOWN_MODEL, RuntimeMetrics, TelemetryConfig
from edgescope.v1 import stream_pb2

Alert = stream_pb2.Alert
GIB = 2**30


def _result(seq: int, infer_ms: float = 5.0, stream_id: str = "s1") -> stream_pb2.Result:
    result = stream_pb2.Result(stream_id=stream_id, seq=seq)
    result.status.code = stream_pb2.FRAME_STATUS_CODE_OK
    result.provenance.model = "m"
    for stage, ms in (("decode", 1.0), ("infer", infer_ms), ("encode", 0.5)):
        result.timings.add(stage=stage, duration_ns=int(ms * 1e6))
    return result


def _device(throttle: tuple[str, ...] = (), gpu_used: int = GIB, host_used: int = 2 * GIB) -> DeviceSample:
    gpu = GpuSample(
        index=0,
        name="fake",
        utilization_percent=50.0,
        memory_used_bytes=gpu_used,
        memory_total_bytes=8 * GIB,
        temperature_c=91.0,
        power_w=70.0,
        timestamp_s=0.0,
        power_limit_w=70.0,
        throttle_reasons=throttle,
    )
    host = HostSample(cpu_percent=10.0, memory_used_bytes=host_used, memory_total_bytes=16 * GIB, process_rss_bytes=1)
    return DeviceSample("nvml", "1 NVIDIA GPU(s) via NVML", (gpu,), host, cost_ns=1000, time_ns=time.time_ns())


def _kinds(alerts: list[stream_pb2.Alert]) -> set[str]:
    return {kind_label(a.kind) for a in alerts}


def _metrics(config: TelemetryConfig | None = None, models: tuple[str, ...] = ("m",)) -> RuntimeMetrics:
    metrics = RuntimeMetrics(config)
    metrics.set_models(list(models))
    return metrics


def _server_ns(result: stream_pb2.Result) -> int:
    return sum(t.duration_ns for t in result.timings)


def test_only_frames_over_their_models_budget_are_flagged() -> None:
    metrics = _metrics(TelemetryConfig(latency_budget_ms={"m": 10.0, "*": 1000.0}), ("m", "other"))
    fast, slow = _result(0, infer_ms=5.0), _result(1, infer_ms=20.0)
    assert metrics.alerts_for("m", _server_ns(fast)) == []
    (late,) = metrics.alerts_for("m", _server_ns(slow))
    assert late.kind == Alert.KIND_LATENCY_BUDGET_EXCEEDED and late.threshold == 10.0
    assert late.value == pytest.approx(21.5)
    # The other budget ("*") applies to models without their own.
    assert metrics.alerts_for("other", _server_ns(_result(2, infer_ms=20.0))) == []
    # A result carrying the alert is counted by kind once it is observed.
    slow.alerts.append(late)
    metrics.observe_result("m", "s1", slow)
    text = generate_latest(metrics.registry).decode()
    assert 'edgescope_alerted_results_total{kind="latency_budget_exceeded",model="m"} 1.0' in text


def test_device_alerts_apply_while_in_force_then_clear() -> None:
    metrics = _metrics(TelemetryConfig(memory_near_full=0.9))
    metrics.observe_device(_device(throttle=("hw_thermal_slowdown", "sw_power_cap"), gpu_used=int(7.5 * GIB)))
    flagged = _kinds(metrics.alerts_for("m", 1_000_000))
    assert flagged == {"gpu_thermal_throttling", "gpu_power_throttling", "gpu_memory_near_full"}
    assert _kinds(list(metrics.snapshot().alerts)) == flagged
    text = generate_latest(metrics.registry).decode()
    assert 'edgescope_alert_active{kind="gpu_thermal_throttling",model=""} 1.0' in text
    assert 'edgescope_gpu_throttle{gpu="0",reason="hw_thermal_slowdown"} 1.0' in text
    metrics.observe_device(_device(host_used=15 * GIB))
    assert _kinds(metrics.alerts_for("m", 1_000_000)) == {"host_memory_near_full"}
    metrics.observe_device(_device())
    assert metrics.alerts_for("m", 1_000_000) == []
    assert (
        'edgescope_alert_active{kind="gpu_thermal_throttling",model=""} 0.0'
        in generate_latest(metrics.registry).decode()
    )


def test_observing_never_changes_the_result() -> None:
    metrics = _metrics(TelemetryConfig(latency_budget_ms={"*": 1.0}))
    metrics.observe_device(_device(throttle=("hw_thermal_slowdown",)))
    result = _result(0, infer_ms=20.0)
    before = result.SerializeToString()
    metrics.observe_result("m", "s1", result, residence_ns=30_000_000)
    assert result.SerializeToString() == before


def test_drops_deadline_misses_and_errors_are_counted_by_reason() -> None:
    metrics = _metrics()
    stale = stream_pb2.Result(stream_id="s1", seq=0)
    stale.status.code = stream_pb2.FRAME_STATUS_CODE_DROPPED
    stale.status.drop_reason = stream_pb2.DROP_REASON_STALE
    deadline = stream_pb2.Result(stream_id="s1", seq=1)
    deadline.status.code = stream_pb2.FRAME_STATUS_CODE_DROPPED
    deadline.status.drop_reason = stream_pb2.DROP_REASON_DEADLINE
    late = _result(2)
    late.status.late = True
    error = stream_pb2.Result(stream_id="s1", seq=3)
    error.status.code = stream_pb2.FRAME_STATUS_CODE_ERROR
    for result in (stale, deadline, late, error):
        metrics.observe_result("m", "s1", result)
    (group,) = metrics.snapshot().models
    assert {d.reason: d.count for d in group.drops} == {"stale": 1, "deadline": 1}
    assert (group.frames, group.errors, group.deadline_misses) == (4, 1, 2)
    text = generate_latest(metrics.registry).decode()
    assert 'edgescope_frames_dropped_total{model="m",reason="stale"} 1.0' in text
    assert 'edgescope_deadline_misses_total{model="m"} 2.0' in text
    assert 'edgescope_inference_failure_total{model="m"} 1.0' in text
    # Only the late-but-processed frame has latency to record.
    assert 'edgescope_frame_duration_seconds_count{model="m"} 1.0' in text


def test_warmup_frames_of_each_stream_are_left_out_of_latency() -> None:
    metrics = _metrics(TelemetryConfig(warmup_frames=2))
    for stream_id in ("a", "b"):
        for seq in range(5):
            metrics.observe_result("m", stream_id, _result(seq, stream_id=stream_id))
    (group,) = metrics.snapshot().models
    assert group.frames == 10 and group.warmup_frames == 4
    assert {s.stage: s.count for s in group.stages}["infer"] == 6
    text = generate_latest(metrics.registry).decode()
    assert 'edgescope_warmup_frames_total{model="m"} 4.0' in text
    assert 'edgescope_stage_duration_seconds_count{model="m",stage="infer"} 6.0' in text


def test_streams_and_their_previews_are_bounded() -> None:
    metrics = _metrics(TelemetryConfig(max_streams=2, preview_interval_s=60.0))
    metrics.observe_result("m", "s1", _result(0))
    assert metrics.preview_due("s1")
    assert not metrics.preview_due("s1")  # claimed: the next one waits for the interval
    metrics.set_preview("s1", b"jpeg-of-s1")
    assert metrics.preview("s1") == b"jpeg-of-s1"
    for stream_id in ("s2", "s3"):
        metrics.observe_result("m", stream_id, _result(0, stream_id=stream_id))
    assert [s.stream_id for s in metrics.snapshot().streams] == ["s3", "s2"]
    # s1 was evicted as least recently active, and its preview with it.
    assert metrics.preview("s1") is None


def test_names_of_models_not_loaded_share_one_label() -> None:
    metrics = _metrics()
    for index in range(2000):
        error = stream_pb2.Result(stream_id="s", seq=index)
        error.status.code = stream_pb2.FRAME_STATUS_CODE_ERROR
        metrics.observe_result(f"no-such-model-{index}", "s", error)
    text = generate_latest(metrics.registry).decode()
    assert "no-such-model" not in text
    assert f'edgescope_inference_failure_total{{model="{UNKNOWN_MODEL}"}} 2000.0' in text
    assert {g.model for g in metrics.snapshot().models} == {UNKNOWN_MODEL}
    # Loading a model gives it its own label from then on.
    metrics.set_models(["m", "no-such-model-0"])
    metrics.observe_result("no-such-model-0", "s", error)
    assert (
        'edgescope_inference_failure_total{model="no-such-model-0"} 1.0' in generate_latest(metrics.registry).decode()
    )


def test_no_device_sample_yet_is_reported_as_such() -> None:
    device = RuntimeMetrics().snapshot().device
    assert device.gpu_source == "none" and device.gpu_status == "not sampled yet"
