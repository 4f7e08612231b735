"""Runtime metrics: what the server records per frame, and what it reports.

``RuntimeMetrics`` observes; it never holds frames and never changes a
result. The server asks it for the alerts in force (``alerts_for``) and puts
them on a result itself, then, once the answer is sent, hands the result to
``observe_result``, which reads its status and stage timings. The background
device sampler feeds ``observe_device``. It reports through a Prometheus
registry (``registry``), a protobuf snapshot (``snapshot``) for the Telemetry
call, the web page and ``edgescope top``, and a small JPEG preview of each
recent stream (``preview``), refreshed at most every ``preview_interval_s``.
The snapshot's messages and the scrape-time gauge families are built in
``reporting``.

Label sets are bounded. Prometheus series are labelled per model, never per
stream: stream ids are unbounded, and a time series per stream would grow the
scrape without end. Only the models the server has loaded (``set_models``)
get a label and a latency recorder of their own; answers naming any other
model are counted under ``UNKNOWN_MODEL``. Per-stream figures live in the
snapshot, for the most recent streams only.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from edgescope.runtime.telemetry.alerts import (
    Alert,
    budget_ms,
    degraded_alert,
    device_alerts,
    kind_label,
    latency_alert,
)
from edgescope.runtime.telemetry.device import DeviceSample
from edgescope.runtime.telemetry.latency import (
    PERCENTILES,
    LatencyRecorder,
    count_monitoring,
    drop_label,
    missed_deadline,
)
from edgescope.runtime.telemetry.reporting import alert_families, device_families, device_health, latency_group
from edgescope.v1 import manifest_pb2, stream_pb2, telemetry_pb2

# Seconds; dense from 1 ms to 100 ms where real-time imaging lives.
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04,
    0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
# Pairing skews: within half a frame period of 15-120 fps sources, and what lies past it.
SKEW_BUCKETS_S = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.033, 0.05, 0.1)
SERVER_TOTAL = "server_total"
# A model's latency alert stays in force this long after the late frame, then lapses if no frame renews it.
LATENCY_ALERT_HOLD_S = 5.0
# The label for answers that name no loaded model (a typo, an unloaded model): one series, however many names.
UNKNOWN_MODEL = "_unknown"


@dataclass(slots=True)
class TelemetryConfig:
    interval_s: float = 1.0
    # The web page and /metrics; None: not served.
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    # Milliseconds in the server per model; key "*" applies to every other model.
    latency_budget_ms: dict[str, float] = field(default_factory=dict)
    # The first frames of each stream are answered but left out of latency figures.
    warmup_frames: int = 0
    # Fraction of GPU or host memory in use that raises an alert.
    memory_near_full: float = 0.9
    # Streams kept for per-stream figures and the preview (least recently active dropped first).
    max_streams: int = 16
    # Seconds between preview images of one stream (each a small JPEG, made off the event loop).
    preview_interval_s: float = 0.5


@dataclass(slots=True)
class _StreamState:
    model: str
    latency: LatencyRecorder
    preview: bytes | None = None
    preview_at: float = -1e9


class RuntimeMetrics:
    """Thread-safe: results arrive on the event loop, reads come from HTTP and gRPC threads."""

    def __init__(self, config: TelemetryConfig | None = None) -> None:
        self.config = config or TelemetryConfig()
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._models: dict[str, LatencyRecorder] = {}
        self._streams: OrderedDict[str, _StreamState] = OrderedDict()
        self._device: DeviceSample | None = None
        self._device_alerts: list[Alert] = []
        self._late: dict[str, tuple[float, Alert]] = {}
        self._loaded: frozenset[str] = frozenset()
        # Models served by their fallback, and why.
        self._degraded: dict[str, str] = {}
        # Each served model's golden-frame verdict on this device (None: skipped).
        self._self_tests: dict[str, manifest_pb2.SelfTestReport | None] = {}
        # Captures the server runs (pull mode): up or not, and why not.
        self._captures: dict[str, tuple[bool, str]] = {}
        r = self.registry
        self._success = Counter("edgescope_inference_success", "Frames answered with a result", ["model"], registry=r)
        self._failure = Counter("edgescope_inference_failure", "Frames answered with an error", ["model"], registry=r)
        self._drops = Counter("edgescope_frames_dropped", "Frames dropped, by reason", ["model", "reason"], registry=r)
        self._deadline = Counter(
            "edgescope_deadline_misses", "Frames that missed their deadline", ["model"], registry=r
        )
        self._out_of_domain = Counter(
            "edgescope_out_of_domain",
            "Frames whose input did not look like what the model was validated on (Result.domain)",
            ["model"],
            registry=r,
        )
        self._drift = Gauge(
            "edgescope_domain_drift",
            "The drift test's statistic over its threshold, on the model's latest result (>= 1: drifting)",
            ["model"],
            registry=r,
        )
        self._drift_alerts = Counter(
            "edgescope_domain_drift_alerts",
            "Streams found drifting away from the model's domain",
            ["model"],
            registry=r,
        )
        self._warmup = Counter(
            "edgescope_warmup_frames", "Frames answered but left out of latency figures", ["model"], registry=r
        )
        self._alerted = Counter(
            "edgescope_alerted_results", "Results that carried an alert, by kind", ["model", "kind"], registry=r
        )
        self._stage = Histogram(
            "edgescope_stage_duration_seconds",
            "Time of one pipeline stage per frame",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self._total = Histogram(
            "edgescope_frame_duration_seconds",
            "Time a frame spent in the server, receive to send",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self._pair_skew = Histogram(
            "edgescope_pairing_skew_seconds",
            "|Capture time of a partner - its leading frame's| in each set of several sources' frames",
            ["model"],
            buckets=SKEW_BUCKETS_S,
            registry=r,
        )
        self._paired = Counter(
            "edgescope_paired_frames",
            "Frames taken into another frame's set (FRAME_STATUS_CODE_PAIRED)",
            ["model"],
            registry=r,
        )
        self._unpaired = Counter(
            "edgescope_unpaired_frames",
            "Frames of a stream of several sources answered unpaired, by source (a name from the model's manifest)",
            ["model", "source"],
            registry=r,
        )
        self._capture_failures = Counter(
            "edgescope_capture_failures", "Times a capture could not open or read its source", ["capture"], registry=r
        )
        r.register(_LiveCollector(self))
        # Label lookups cost more than the observation itself: children are kept per (model, stage).
        self._stage_children: dict[tuple[str, str], Histogram] = {}

    # -- recording ---------------------------------------------------------------------------------

    def set_models(self, names: list[str]) -> None:
        """The models now loaded: the only names that get a label of their own."""
        with self._lock:
            added = set(names) - self._loaded
            self._loaded = frozenset(names)
        for model in sorted(added):
            self._start_counters(model)

    def _start_counters(self, model: str) -> None:
        """Start every per-model counter at 0, so its series exist before its first event.

        Rates and alert rules over a counter that appears only with its first failure miss that
        failure; starting at 0 also keeps a model that never succeeded visible on dashboards.
        """
        self._success.labels(model)
        self._failure.labels(model)
        self._deadline.labels(model)
        self._out_of_domain.labels(model)
        self._drift_alerts.labels(model)
        self._warmup.labels(model)
        for reason in stream_pb2.DropReason.values():
            if reason != stream_pb2.DROP_REASON_UNSPECIFIED:
                self._drops.labels(model, drop_label(stream_pb2.FrameStatus(drop_reason=reason)))

    def set_self_tests(self, verdicts: dict[str, manifest_pb2.SelfTestReport | None]) -> None:
        """The served models' self-test verdicts (None: run with --skip-self-test)."""
        with self._lock:
            self._self_tests = dict(verdicts)

    def set_degraded(self, model: str, reason: str) -> None:
        """``model`` is served by its fallback for ``reason`` (empty: its primary serves again)."""
        with self._lock:
            if reason:
                self._degraded[model] = reason
            else:
                self._degraded.pop(model, None)

    def label(self, model: str) -> str:
        """``model`` if it is loaded, else ``UNKNOWN_MODEL``: label sets stay bounded whatever clients send."""
        return model if model in self._loaded else UNKNOWN_MODEL

    def observe_result(
        self, model: str, stream_id: str, result: stream_pb2.Result, residence_ns: int | None = None
    ) -> None:
        """Record one answer after it was sent; reads the result, never changes it.

        ``residence_ns`` is the frame's time in the server, arrival to answer; without it
        the sum of the result's stage timings.
        """
        model = self.label(model)
        if residence_ns is None:
            residence_ns = sum(t.duration_ns for t in result.timings)
        code = result.status.code
        now_s = time.perf_counter_ns() / 1e9
        late = missed_deadline(result.status)
        with self._lock:
            model_latency = self._model(model)
            stream = self._stream(model, stream_id)
            measured = stream.latency.count_result(now_s)
            model_latency.count_result(now_s)
            if late:
                stream.latency.deadline_misses += 1
                model_latency.deadline_misses += 1
            for partner in result.pairing.partners:
                stream.latency.pairing_skew.record(abs(partner.skew_ns))
                model_latency.pairing_skew.record(abs(partner.skew_ns))
            for recorder in (stream.latency, model_latency):
                count_monitoring(recorder, result)
            if code == stream_pb2.FRAME_STATUS_CODE_DROPPED:
                reason = drop_label(result.status)
                stream.latency.count_drop(reason)
                model_latency.count_drop(reason)
                if result.status.drop_reason == stream_pb2.DROP_REASON_UNPAIRED:
                    stream.latency.unpaired[result.pairing.source] += 1
                    model_latency.unpaired[result.pairing.source] += 1
            elif code == stream_pb2.FRAME_STATUS_CODE_PAIRED:
                pass  # its set's result, and the time it took, are on the leading frame
            elif code != stream_pb2.FRAME_STATUS_CODE_OK:
                stream.latency.errors += 1
                model_latency.errors += 1
            elif not measured:
                model_latency.warmup_frames += 1
            else:
                for timing in result.timings:
                    stream.latency.add(timing.stage, timing.duration_ns)
                    model_latency.add(timing.stage, timing.duration_ns)
                stream.latency.add(SERVER_TOTAL, residence_ns)
                model_latency.add(SERVER_TOTAL, residence_ns)
        if late:
            self._deadline.labels(model).inc()
        if result.domain.checked and not result.domain.in_domain:
            self._out_of_domain.labels(model).inc()
        if result.domain.drift_threshold > 0:
            self._drift.labels(model).set(result.domain.drift / result.domain.drift_threshold)
        if result.pairing.partners:
            for partner in result.pairing.partners:
                self._pair_skew.labels(model).observe(abs(partner.skew_ns) / 1e9)
        if code == stream_pb2.FRAME_STATUS_CODE_DROPPED:
            self._drops.labels(model, drop_label(result.status)).inc()
            if result.status.drop_reason == stream_pb2.DROP_REASON_UNPAIRED and model != UNKNOWN_MODEL:
                self._unpaired.labels(model, result.pairing.source).inc()
        elif code == stream_pb2.FRAME_STATUS_CODE_PAIRED:
            self._paired.labels(model).inc()
        elif code != stream_pb2.FRAME_STATUS_CODE_OK:
            self._failure.labels(model).inc()
        else:
            self._success.labels(model).inc()
            if not measured:
                self._warmup.labels(model).inc()
            else:
                for timing in result.timings:
                    child = self._stage_children.get((model, timing.stage))
                    if child is None:
                        child = self._stage_children[(model, timing.stage)] = self._stage.labels(model, timing.stage)
                    child.observe(timing.duration_ns / 1e9)
                self._total.labels(model).observe(residence_ns / 1e9)
        for alert in result.alerts:
            self._alerted.labels(model, kind_label(alert.kind)).inc()
            if alert.kind == stream_pb2.Alert.KIND_DRIFT:
                self._drift_alerts.labels(model).inc()

    def preview_due(self, stream_id: str) -> bool:
        """True when this stream's preview is older than the preview interval (and claims the next one)."""
        now = time.monotonic()
        with self._lock:
            state = self._streams.get(stream_id)
            if state is not None and now - state.preview_at < self.config.preview_interval_s:
                return False
            if state is not None:
                state.preview_at = now
            return True

    def set_preview(self, stream_id: str, jpeg: bytes) -> None:
        with self._lock:
            state = self._streams.get(stream_id)
            if state is not None:
                state.preview = jpeg

    def observe_capture(self, name: str, *, up: bool, reason: str = "") -> None:
        """A capture started delivering (up) or lost its source (down, with the reason)."""
        with self._lock:
            self._captures[name] = (up, reason)
        if not up:
            self._capture_failures.labels(name).inc()

    def observe_device(self, sample: DeviceSample) -> None:
        alerts = device_alerts(sample, self.config.memory_near_full)
        with self._lock:
            self._device = sample
            self._device_alerts = alerts

    def alerts_for(self, model: str, server_ns: int) -> list[Alert]:
        """Alerts for a result that spent ``server_ns`` in the server: its own lateness, the device's state."""
        model = self.label(model)
        late = latency_alert(model, server_ns / 1e6, budget_ms(self.config.latency_budget_ms, model))
        with self._lock:
            if late is not None:
                self._late[model] = (time.monotonic(), late)
            else:
                self._late.pop(model, None)
            alerts = [late] if late is not None else []
            degraded = self._degraded.get(model)
            if degraded is not None:
                alerts.append(degraded_alert(model, degraded))
            alerts.extend(self._device_alerts)
        return alerts

    def _model(self, model: str) -> LatencyRecorder:
        latency = self._models.get(model)
        if latency is None:
            latency = self._models[model] = LatencyRecorder()
        return latency

    def _stream(self, model: str, stream_id: str) -> _StreamState:
        state = self._streams.get(stream_id)
        if state is None:
            state = self._streams[stream_id] = _StreamState(model, LatencyRecorder(self.config.warmup_frames))
            while len(self._streams) > self.config.max_streams:
                self._streams.popitem(last=False)
        else:
            self._streams.move_to_end(stream_id)
        return state

    # -- reporting ---------------------------------------------------------------------------------

    def active_alerts(self) -> list[Alert]:
        now = time.monotonic()
        with self._lock:
            late = [alert for at, alert in self._late.values() if now - at <= LATENCY_ALERT_HOLD_S]
            degraded = [degraded_alert(model, reason) for model, reason in sorted(self._degraded.items())]
            captures = [
                Alert(kind=Alert.KIND_CAPTURE_UNAVAILABLE, message=f"capture {name}: {reason}")
                for name, (up, reason) in sorted(self._captures.items())
                if not up
            ]
            return late + degraded + list(self._device_alerts) + captures

    def preview(self, stream_id: str = "") -> bytes | None:
        """The latest preview JPEG of ``stream_id`` (or of the most recently active stream that has one)."""
        with self._lock:
            candidates = [self._streams[stream_id]] if stream_id in self._streams else []
            candidates += [s for s in reversed(self._streams.values())]
            for state in candidates:
                if state.preview is not None:
                    return state.preview
        return None

    def snapshot(self) -> telemetry_pb2.TelemetrySnapshot:
        now = time.perf_counter_ns() / 1e9
        alerts = self.active_alerts()
        with self._lock:
            models = [latency_group(name, "", latency, now) for name, latency in sorted(self._models.items())]
            streams = [latency_group(s.model, sid, s.latency, now) for sid, s in reversed(self._streams.items())]
            device = device_health(self._device)
        return telemetry_pb2.TelemetrySnapshot(
            time_ns=time.time_ns(), models=models, streams=streams, device=device, alerts=alerts
        )

    def watch_audit_forwarding(self, forward: ForwardCounts) -> None:
        """Count the audit trail's forwarding (records sent, dropped, failures), read at scrape time."""
        self.registry.register(_AuditForwardingCollector(forward))

    def live_families(self) -> Iterable[Metric]:
        """Gauges computed at scrape time: percentiles, jitter, fps, device health, alerts."""
        quantiles = GaugeMetricFamily(
            "edgescope_latency_percentile_seconds",
            # Not "quantile": that label belongs to summaries, and promtool rejects it on a gauge.
            "Latency percentile since start (warm-up excluded); percentile 100 is the maximum",
            labels=["model", "stage", "percentile"],
        )
        jitter = GaugeMetricFamily(
            "edgescope_latency_jitter_seconds",
            "Mean absolute change in a stage's time between consecutive frames",
            labels=["model", "stage"],
        )
        fps = GaugeMetricFamily("edgescope_fps", "Results per second over the last 2 s", labels=["model"])
        budget = GaugeMetricFamily(
            "edgescope_latency_budget_seconds", "Configured server-time budget per model", labels=["model"]
        )
        now = time.perf_counter_ns() / 1e9
        with self._lock:
            for model, latency in self._models.items():
                fps.add_metric([model], latency.recent_fps(now))
                limit = budget_ms(self.config.latency_budget_ms, model)
                if limit is not None:
                    budget.add_metric([model], limit / 1000.0)
                for stage, stats in latency.summary().items():
                    values = (stats.p50_ms, stats.p90_ms, stats.p99_ms, stats.p999_ms, stats.max_ms)
                    for q, value in zip((*PERCENTILES, 100.0), values, strict=True):
                        quantiles.add_metric([model, stage, f"{q:g}"], value / 1000.0)
                    jitter.add_metric([model, stage], stats.jitter_ms / 1000.0)
            device = self._device
            models = list(self._models)
            captures = dict(self._captures)
            self_tests = dict(self._self_tests)
        capture_up = GaugeMetricFamily(
            "edgescope_capture_up", "1 while a capture delivers results from its source", labels=["capture"]
        )
        for name, (up, _) in sorted(captures.items()):
            capture_up.add_metric([name], 1.0 if up else 0.0)
        checked = GaugeMetricFamily(
            "edgescope_model_self_test_passed",
            "1 when the served model reproduced its golden frames on this device at load; 0 when it did not "
            "(served only with --allow-failed-validation); absent with --skip-self-test",
            labels=["model", "runner"],
        )
        for name, report in sorted(self_tests.items()):
            if report is not None:
                checked.add_metric([name, report.runner.kind], 1.0 if report.passed else 0.0)
        yield from (quantiles, jitter, fps, budget, capture_up, checked)
        yield from alert_families(self.active_alerts(), models)
        if device is not None:
            yield from device_families(device)


class ForwardCounts(Protocol):
    """What the audit trail's forwarding counts (``archive.atna.SyslogForwarder``)."""

    sent: int
    dropped: int
    failures: int


class _AuditForwardingCollector:
    def __init__(self, forward: ForwardCounts) -> None:
        self._forward = forward

    def collect(self) -> Iterable[Metric]:
        forward = self._forward
        yield CounterMetricFamily(
            "edgescope_audit_forwarded", "Audit records sent to the audit repository", value=forward.sent
        )
        yield CounterMetricFamily(
            "edgescope_audit_forward_dropped",
            "Audit records not forwarded because the queue to the audit repository was full (the trail has them)",
            value=forward.dropped,
        )
        yield CounterMetricFamily(
            "edgescope_audit_forward_failures",
            "Failed attempts to send to the audit repository (each retried)",
            value=forward.failures,
        )


class _LiveCollector:
    def __init__(self, metrics: RuntimeMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.live_families()
