from __future__ import annotations

import numpy as np
import pytest

from edgescope.runtime.client.clock import ClockEstimator, ClockSample
from edgescope.runtime.telemetry.latency import (
    LatencyRecorder,
    StageHistogram,
    drop_label,
    missed_deadline,
    reason_code,
)
from edgescope.v1 import stream_pb2


def test_histogram_percentiles_are_within_one_percent_of_exact() -> None:
    rng = np.random.default_rng(3)
    # A long-tailed latency distribution: mostly ~8 ms with rare 40-200 ms stalls.
    values_ns = np.concatenate([rng.normal(8e6, 1e6, 20_000), rng.uniform(40e6, 200e6, 40)]).astype(np.int64)
    histogram = StageHistogram()
    for value in values_ns:
        histogram.record(int(value))
    stats = histogram.stats()
    exact_ms = np.percentile(values_ns // 1000, [50, 90, 99, 99.9]) / 1000.0
    got = [stats.p50_ms, stats.p90_ms, stats.p99_ms, stats.p999_ms]
    assert got == pytest.approx(list(exact_ms), rel=0.01)
    assert stats.max_ms == pytest.approx(values_ns.max() / 1e6, rel=0.01)
    assert stats.count == len(values_ns)


def test_jitter_is_the_mean_change_between_consecutive_frames() -> None:
    histogram = StageHistogram()
    for ms in (10, 12, 10, 16):
        histogram.record(ms * 1_000_000)
    assert histogram.stats().jitter_ms == pytest.approx((2 + 2 + 6) / 3, rel=0.01)


def test_durations_beyond_the_range_are_clamped_and_still_counted() -> None:
    histogram = StageHistogram()
    histogram.record(-5)
    histogram.record(3_600 * 10**9)
    stats = histogram.stats()
    assert stats.count == 2
    assert stats.max_ms == pytest.approx(60_000, rel=0.01)


def test_warmup_frames_are_counted_but_left_out_of_latency() -> None:
    recorder = LatencyRecorder(warmup=2)
    measured = [recorder.count_result(float(i)) for i in range(5)]
    assert measured == [False, False, True, True, True]
    assert recorder.results == 5 and recorder.warmup_frames == 2
    assert recorder.fps == pytest.approx(1.0)
    summary = recorder.as_dict()
    assert summary["warmup_frames"] == 2


def test_recent_fps_covers_only_the_last_window() -> None:
    recorder = LatencyRecorder()
    for i in range(31):
        recorder.count_result(100.0 + i / 30)
    assert recorder.recent_fps(101.0) == pytest.approx(30.0)
    assert recorder.recent_fps(110.0) == 0.0


def test_table_and_dict_name_every_stage_and_drop_reason() -> None:
    recorder = LatencyRecorder()
    recorder.count_result(0.0)
    recorder.add("infer", 5_000_000)
    recorder.count_drop("stale")
    assert "infer" in recorder.format_table() and "stale 1" in recorder.format_table()
    stages = recorder.as_dict()["stages_ms"]
    assert isinstance(stages, dict) and stages["infer"]["p999_ms"] == pytest.approx(5.0, rel=0.01)


def test_drop_labels_come_from_the_reason_enum_or_the_text() -> None:
    stale = stream_pb2.FrameStatus(code=stream_pb2.FRAME_STATUS_CODE_DROPPED, drop_reason=stream_pb2.DROP_REASON_STALE)
    assert drop_label(stale) == "stale"
    assert drop_label(stream_pb2.FrameStatus(reason="Queue full: 12 waiting")) == "queue_full"
    assert reason_code("") == "unspecified"
    assert missed_deadline(stream_pb2.FrameStatus(late=True))
    assert missed_deadline(stream_pb2.FrameStatus(drop_reason=stream_pb2.DROP_REASON_DEADLINE))
    assert not missed_deadline(stale)


def test_clock_offset_and_path_split_are_recovered_from_echoed_stamps() -> None:
    # The server's clock runs 250 ms ahead; uplink 3 ms, downlink 2 ms (+ queueing on some frames).
    offset, estimator, start = 250_000_000, ClockEstimator(), 1_700_000_000_000_000_000
    rng = np.random.default_rng(0)
    samples = []
    for i in range(8):
        t0 = start + i * 33_000_000
        up, down = 3_000_000 + int(rng.integers(0, 4_000_000)), 2_000_000 + int(rng.integers(0, 4_000_000))
        if i == 5:
            up, down = 3_000_000, 2_000_000  # one frame with no queueing: NTP's best sample
        t1 = t0 + up + offset
        t2 = t1 + 9_000_000
        samples.append(ClockSample(t0, t1, t2, t2 - offset + down))
        estimator.add(samples[-1])
    best = estimator.best
    assert best is not None
    assert best.offset_ns == pytest.approx(offset + 500_000)  # half the path asymmetry: NTP's known bound
    assert best.delay_ns == 5_000_000
    split = estimator.split(samples[5])
    assert split is not None and sum(split) == 5_000_000
    assert estimator.as_dict()["samples"] == 8


def test_results_without_server_stamps_give_no_clock_estimate() -> None:
    estimator = ClockEstimator()
    estimator.add(ClockSample(10, 0, 0, 20))
    assert estimator.best is None and estimator.split(ClockSample(10, 0, 0, 20)) is None
    assert estimator.as_dict() == {"samples": 0}
