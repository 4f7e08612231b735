"""What telemetry costs: latency recording per frame, and one device sample.

Per frame, the server asks ``RuntimeMetrics.alerts_for`` for the alerts in
force and, once the answer is sent, ``observe_result`` records six stage
timings plus the server total into the model's and the stream's HDR
histograms and the Prometheus histograms. That is measured against a
baseline in the same run: the bare loop that builds the same Result. A device sample (NVML or tegrastats where there
is a GPU, psutil always) is timed on its own, and so are a /metrics render
and a snapshot, which happen per scrape or per second, not per frame.

    .venv/bin/python benchmarks/telemetry_overhead.py [--frames 20000] [--out out/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import generate_latest

from edgescope.runtime.telemetry.device import DeviceSampler
from edgescope.runtime.telemetry.metrics import RuntimeMetrics, TelemetryConfig
from edgescope.v1 import stream_pb2

STAGES = {"queue": 0.2, "decode": 1.1, "preprocess": 2.3, "infer": 8.5, "postprocess": 1.7, "encode": 0.9}


def _result(seq: int) -> stream_pb2.Result:
    result = stream_pb2.Result(stream_id="bench", seq=seq)
    result.status.code = stream_pb2.FRAME_STATUS_CODE_OK
    result.provenance.model = "bench-model"
    # Durations vary frame to frame like real ones, so histogram buckets are not all the same.
    for stage, ms in STAGES.items():
        result.timings.add(stage=stage, duration_ns=int(ms * 1e6 * (0.8 + 0.4 * ((seq * 7919) % 101) / 100)))
    return result


def _per_call_ns(run: Callable[[int], None], n: int, repeats: int = 5) -> list[float]:
    """Median-friendly: ``repeats`` batches of ``n`` calls, ns per call for each batch."""
    out = []
    for r in range(repeats):
        start = time.perf_counter_ns()
        for i in range(n):
            run(r * n + i)
        out.append((time.perf_counter_ns() - start) / n)
    return out


def _each_ns(run: Callable[[], object], n: int) -> list[int]:
    durations = []
    for _ in range(n):
        start = time.perf_counter_ns()
        run()
        durations.append(time.perf_counter_ns() - start)
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks"))
    args = parser.parse_args()

    metrics = RuntimeMetrics(TelemetryConfig(latency_budget_ms={"*": 50.0}))
    residence_ns = 15_000_000

    def baseline(seq: int) -> None:
        _result(seq)

    def recorded(seq: int) -> None:
        # What a stream does per frame: the alerts in force onto the result, then the record of it.
        result = _result(seq)
        result.alerts.extend(metrics.alerts_for("bench-model", residence_ns))
        metrics.observe_result("bench-model", "bench", result, residence_ns)

    # Warm both paths (allocations, label children) before timing.
    _per_call_ns(baseline, 1000, 1)
    _per_call_ns(recorded, 1000, 1)
    base = _per_call_ns(baseline, args.frames)
    full = _per_call_ns(recorded, args.frames)
    record_ns = statistics.median(full) - statistics.median(base)

    sampler = DeviceSampler(1.0, metrics.observe_device)
    try:
        sampler.sample()
        device_ns = [sampler.sample().cost_ns for _ in range(args.samples)]
        metrics.observe_device(sampler.sample())
        gpu = sampler.gpu_status
    finally:
        sampler.close()
    scrape_ns = _each_ns(lambda: generate_latest(metrics.registry), 50)
    snapshot_ns = _each_ns(metrics.snapshot, 50)

    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "gpu": gpu,
        },
        "frames": args.frames,
        "per_frame_recording_ns": {
            "median": round(record_ns),
            "with_recording_median": round(statistics.median(full)),
            "baseline_median": round(statistics.median(base)),
            "what": "alerts_for + observe_result (7 values into 2 HDR histograms + Prometheus histograms)"
            " minus building the same Result",
        },
        "device_sample_ns": {
            "median": round(statistics.median(device_ns)),
            "p90": round(sorted(device_ns)[int(0.9 * len(device_ns))]),
            "samples": len(device_ns),
        },
        "metrics_scrape_ns": {"median": round(statistics.median(scrape_ns))},
        "snapshot_ns": {"median": round(statistics.median(snapshot_ns))},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "telemetry_overhead.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    machine = report["machine"]
    print(f"machine: {machine['processor']}, {machine['cpus']} CPUs, Python {machine['python']}; GPU: {gpu}")
    print(
        f"latency recording per frame: {record_ns / 1000:.1f} us median "
        f"({statistics.median(full) / 1000:.1f} us with it, {statistics.median(base) / 1000:.1f} us baseline)"
    )
    print(f"device sample: {statistics.median(device_ns) / 1000:.1f} us median over {len(device_ns)}")
    print(
        f"/metrics render: {statistics.median(scrape_ns) / 1000:.0f} us; snapshot: "
        f"{statistics.median(snapshot_ns) / 1000:.0f} us"
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
