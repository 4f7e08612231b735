"""How ``RuntimeMetrics``' figures are reported, built from what it holds: the Telemetry snapshot's
messages (one latency group, device health) and the Prometheus gauge families computed at scrape
time for the alerts in force and the device's health."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from edgescope.runtime.telemetry.alerts import Alert, kind_label
from edgescope.runtime.telemetry.device import DeviceSample
from edgescope.runtime.telemetry.gpu import THROTTLE_REASONS
from edgescope.runtime.telemetry.latency import LatencyRecorder, StageStats
from edgescope.v1 import stream_pb2, telemetry_pb2


def latency_group(model: str, stream_id: str, latency: LatencyRecorder, now_s: float) -> telemetry_pb2.LatencyGroup:
    group = telemetry_pb2.LatencyGroup(
        model=model,
        stream_id=stream_id,
        frames=latency.results,
        errors=latency.errors,
        deadline_misses=latency.deadline_misses,
        warmup_frames=latency.warmup_frames,
        fps=latency.recent_fps(now_s),
        out_of_domain_frames=latency.out_of_domain_frames,
        drift_alerts=latency.drift_alerts,
        withheld_frames=latency.withheld_frames,
        drops=[telemetry_pb2.DropCount(reason=r, count=n) for r, n in sorted(latency.drops.items())],
    )
    if latency.pairing_skew.count:
        group.pairing_skew.CopyFrom(_stage_latency("pairing_skew", latency.pairing_skew.stats()))
        group.unpaired.extend(telemetry_pb2.DropCount(reason=s, count=n) for s, n in sorted(latency.unpaired.items()))
    group.stages.extend(_stage_latency(stage, stats) for stage, stats in latency.summary().items())
    return group


def _stage_latency(stage: str, s: StageStats) -> telemetry_pb2.StageLatency:
    return telemetry_pb2.StageLatency(
        stage=stage,
        count=s.count,
        p50_ms=s.p50_ms,
        p90_ms=s.p90_ms,
        p99_ms=s.p99_ms,
        p999_ms=s.p999_ms,
        max_ms=s.max_ms,
        mean_ms=s.mean_ms,
        jitter_ms=s.jitter_ms,
    )


def device_health(sample: DeviceSample | None) -> telemetry_pb2.DeviceHealth:
    if sample is None:
        return telemetry_pb2.DeviceHealth(gpu_source="none", gpu_status="not sampled yet")
    host = sample.host
    return telemetry_pb2.DeviceHealth(
        gpu_source=sample.gpu_source,
        gpu_status=sample.gpu_status,
        sample_cost_us=sample.cost_ns / 1000.0,
        sample_time_ns=sample.time_ns,
        host=telemetry_pb2.HostHealth(
            cpu_percent=host.cpu_percent,
            memory_used_bytes=host.memory_used_bytes,
            memory_total_bytes=host.memory_total_bytes,
            process_rss_bytes=host.process_rss_bytes,
        ),
        gpus=[
            telemetry_pb2.GpuHealth(
                index=g.index,
                name=g.name,
                utilization_percent=g.utilization_percent,
                memory_used_bytes=g.memory_used_bytes,
                memory_total_bytes=g.memory_total_bytes,
                process_memory_bytes=g.process_memory_bytes,
                temperature_c=g.temperature_c,
                power_w=g.power_w,
                power_limit_w=g.power_limit_w,
                sm_clock_mhz=g.sm_clock_mhz,
                memory_clock_mhz=g.memory_clock_mhz,
                throttle_reasons=list(g.throttle_reasons),
                ecc_corrected=g.ecc_corrected,
                ecc_uncorrected=g.ecc_uncorrected,
            )
            for g in sample.gpus
        ],
    )


def alert_families(alerts: list[Alert], models: list[str]) -> Iterable[Metric]:
    family = GaugeMetricFamily(
        "edgescope_alert_active", "1 while an alert is in force (model empty: device-wide)", labels=["kind", "model"]
    )
    active = {(kind_label(a.kind), a.model) for a in alerts}
    # Every kind is exported, 0 when clear, so an alert rule sees the series before it first fires.
    for kind in stream_pb2.Alert.Kind.values():
        if kind == stream_pb2.Alert.KIND_UNSPECIFIED:
            continue
        label = kind_label(kind)
        per_model = (stream_pb2.Alert.KIND_LATENCY_BUDGET_EXCEEDED, stream_pb2.Alert.KIND_MODEL_DEGRADED)
        scopes = models if kind in per_model else [""]
        for model in scopes:
            family.add_metric([label, model], 1.0 if (label, model) in active else 0.0)
    yield family


def device_families(sample: DeviceSample) -> Iterable[Metric]:
    def gauge(name: str, doc: str, labels: tuple[str, ...] = ("gpu",)) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=list(labels))

    available = gauge("edgescope_gpu_available", "1 when GPU telemetry is available", ("source",))
    available.add_metric([sample.gpu_source], 1.0 if sample.gpus else 0.0)
    info = gauge("edgescope_gpu_info", "GPU identity (value 1)", ("gpu", "name"))
    util = gauge("edgescope_gpu_utilization_ratio", "GPU busy fraction over the last sample period")
    used = gauge("edgescope_gpu_memory_used_bytes", "GPU memory in use (Jetson: shared RAM)")
    total = gauge("edgescope_gpu_memory_total_bytes", "GPU memory in total")
    process = gauge("edgescope_gpu_process_memory_bytes", "GPU memory held by this server process")
    temp = gauge("edgescope_gpu_temperature_celsius", "GPU temperature")
    power = gauge("edgescope_gpu_power_watts", "GPU power draw")
    limit = gauge("edgescope_gpu_power_limit_watts", "GPU enforced power limit")
    sm = gauge("edgescope_gpu_sm_clock_hertz", "GPU SM clock")
    mem_clock = gauge("edgescope_gpu_memory_clock_hertz", "GPU memory clock")
    throttle = gauge("edgescope_gpu_throttle", "1 while clocks are held down for this reason", ("gpu", "reason"))
    ecc = gauge("edgescope_gpu_ecc_errors", "Volatile ECC error count since driver load", ("gpu", "type"))
    for g in sample.gpus:
        i = str(g.index)
        info.add_metric([i, g.name], 1.0)
        # -1 marks a field this GPU does not report (Thor prints no utilisation): left out, not exported.
        for family, value, scale in (
            (util, g.utilization_percent, 0.01),
            (used, g.memory_used_bytes, 1.0),
            (total, g.memory_total_bytes, 1.0),
            (process, g.process_memory_bytes, 1.0),
            (temp, g.temperature_c, 1.0),
            (power, g.power_w, 1.0),
            (limit, g.power_limit_w, 1.0),
            (sm, g.sm_clock_mhz, 1e6),
            (mem_clock, g.memory_clock_mhz, 1e6),
        ):
            if value >= 0:
                family.add_metric([i], value * scale)
        for _, reason in THROTTLE_REASONS:
            throttle.add_metric([i, reason], 1.0 if reason in g.throttle_reasons else 0.0)
        for kind, count in (("corrected", g.ecc_corrected), ("uncorrected", g.ecc_uncorrected)):
            if count >= 0:
                ecc.add_metric([i, kind], float(count))
    host = sample.host
    cpu = GaugeMetricFamily("edgescope_cpu_utilization_ratio", "Host CPU busy fraction over the last sample period")
    cpu.add_metric([], host.cpu_percent / 100.0)
    host_used = GaugeMetricFamily("edgescope_host_memory_used_bytes", "Host memory in use (total - available)")
    host_used.add_metric([], float(host.memory_used_bytes))
    host_total = GaugeMetricFamily("edgescope_host_memory_total_bytes", "Host memory in total")
    host_total.add_metric([], float(host.memory_total_bytes))
    rss = GaugeMetricFamily("edgescope_process_resident_memory_bytes", "Resident memory of this server process")
    rss.add_metric([], float(host.process_rss_bytes))
    cost = GaugeMetricFamily("edgescope_telemetry_sample_duration_seconds", "What the last device sample cost")
    cost.add_metric([], sample.cost_ns / 1e9)
    yield from (available, info, util, used, total, process, temp, power, limit, sm, mem_clock, throttle, ecc)
    yield from (cpu, host_used, host_total, rss, cost)
