"""``edgescope perf``: load a running server and measure latency and throughput per load level.

In the spirit of Triton's perf_analyzer. Each step holds one load level:
``concurrency`` N (N requests always outstanding, each sent as soon as the
previous one answers) or a ``request rate`` (requests started on a schedule,
constant or Poisson, whatever the answers do). After a warm-up, it measures
fixed windows until the last few agree (throughput and mean latency each
within ``stability`` of their mean) or the window budget runs out, and
reports those windows: throughput, latency percentiles, errors, and for the
Open Inference Protocol the server's own queue and compute time per request
(from ModelStatistics).

Two protocols: ``kserve`` sends ModelInfer with random tensors shaped from the
model's metadata; ``stream`` sends frames of a source on edgescope's Stream
call, one bidirectional stream per concurrent request (``stream_lanes`` for
request-rate steps), every frame answered in order (``perf_targets``).
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgescope.errors import ConfigError
from edgescope.kserve.v2 import inference_pb2 as kserve
from edgescope.runtime.client.perf_options import PerfError, PerfOptions, RequestFailed
from edgescope.runtime.client.perf_targets import KServeTarget, StreamTarget, Target, source_frames
from edgescope.runtime.transport import aio_channel, channel_options

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True, slots=True)
class Window:
    duration_s: float
    latencies_s: list[float]
    errors: int


@dataclass(frozen=True, slots=True)
class StepResult:
    mode: str
    load: float
    stable: bool
    windows: int
    duration_s: float
    requests: int
    errors: int
    requests_per_s: float
    inferences_per_s: float
    latency_ms: dict[str, float]
    delayed: int = 0
    error_messages: dict[str, int] = field(default_factory=dict)
    server_us: dict[str, float] = field(default_factory=dict)


def _summary(latencies_s: Sequence[float]) -> dict[str, float]:
    if not latencies_s:
        return {}
    values = np.asarray(latencies_s) * 1000.0
    figures = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
    return figures | {"avg": float(values.mean()), "min": float(values.min()), "max": float(values.max())}


def is_stable(windows: Sequence[Window], tolerance: float) -> bool:
    """Every window's throughput and mean latency within ``tolerance`` of the windows' mean."""
    if not windows or any(not w.latencies_s for w in windows):
        return False
    throughputs = [len(w.latencies_s) / w.duration_s for w in windows]
    means = [float(np.mean(w.latencies_s)) for w in windows]
    return all(
        abs(value - float(np.mean(series))) <= tolerance * float(np.mean(series))
        for series in (throughputs, means)
        for value in series
    )


class _Load:
    """Requests in flight for one step; completions recorded in the order they finish."""

    def __init__(self, target: Target, options: PerfOptions) -> None:
        self._target = target
        self._options = options
        self.done: list[tuple[float, float, bool]] = []
        self.errors: Counter[str] = Counter()
        self.delayed = 0
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def _one(self, lane: int) -> None:
        started = time.perf_counter()
        try:
            await self._target.request(lane)
            ok = True
        except RequestFailed as exc:
            ok = False
            self.errors[str(exc)[:200]] += 1
        self.done.append((time.perf_counter(), time.perf_counter() - started, ok))

    async def _closed_loop(self, lane: int) -> None:
        while not self._stop.is_set():
            await self._one(lane)

    async def _scheduled(self, rate: float) -> None:
        rng = random.Random(self._options.seed)
        lanes = itertools.cycle(range(self._options.stream_lanes))
        next_at = time.perf_counter()
        while not self._stop.is_set():
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(self._tasks) >= self._options.max_outstanding:
                self.delayed += 1
            else:
                self._spawn(self._one(next(lanes)))
            next_at += rng.expovariate(rate) if self._options.distribution == "poisson" else 1.0 / rate

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self, mode: str, load: float) -> None:
        if mode == "concurrency":
            for lane in range(int(load)):
                self._spawn(self._closed_loop(lane))
        else:
            self._spawn(self._scheduled(load))

    async def stop(self) -> None:
        self._stop.set()
        tasks = list(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self._options.request_timeout_s + 1.0)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)


async def _step(target: Target, options: PerfOptions, mode: str, load: float) -> StepResult:
    run = _Load(target, options)
    run.start(mode, load)
    try:
        await asyncio.sleep(options.warmup_s)
        first = len(run.done)
        windows: list[Window] = []
        counted = first
        for _ in range(options.max_windows):
            started = time.perf_counter()
            await asyncio.sleep(options.window_s)
            ended = time.perf_counter()
            finished = run.done[counted:]
            counted += len(finished)
            windows.append(
                Window(
                    ended - started, [latency for _, latency, ok in finished if ok], sum(not ok for *_, ok in finished)
                )
            )
            if len(windows) >= options.stable_windows and is_stable(
                windows[-options.stable_windows :], options.stability
            ):
                break
    finally:
        await run.stop()
    used = windows[-options.stable_windows :]
    duration = sum(w.duration_s for w in used)
    latencies = [latency for w in used for latency in w.latencies_s]
    return StepResult(
        mode=mode,
        load=load,
        stable=is_stable(used, options.stability) and len(used) == options.stable_windows,
        windows=len(windows),
        duration_s=duration,
        requests=len(latencies),
        errors=sum(w.errors for w in used),
        requests_per_s=len(latencies) / duration if duration else 0.0,
        inferences_per_s=len(latencies) * options.batch_size / duration if duration else 0.0,
        latency_ms=_summary(latencies),
        delayed=run.delayed,
        error_messages=dict(run.errors.most_common(5)),
    )


def _server_delta(before: kserve.ModelStatistics | None, after: kserve.ModelStatistics | None) -> dict[str, float]:
    """The server's mean time per successful request during the step, in microseconds."""
    if before is None or after is None:
        return {}
    stats, old = after.inference_stats, before.inference_stats
    requests = stats.success.count - old.success.count
    if requests <= 0:
        return {}
    parts = ("queue", "compute_input", "compute_infer", "compute_output")
    return {part: (getattr(stats, part).ns - getattr(old, part).ns) / requests / 1000.0 for part in parts}


async def run_perf(options: PerfOptions) -> list[StepResult]:
    """Every step of the sweep, in order."""
    if options.protocol not in ("kserve", "stream"):
        raise ConfigError(f"protocol {options.protocol!r} must be kserve or stream")
    if options.distribution not in ("constant", "poisson"):
        raise ConfigError(f"distribution {options.distribution!r} must be constant or poisson")
    if options.request_rates and any(rate <= 0 for rate in options.request_rates):
        raise ConfigError(f"request rates must be above 0, not {list(options.request_rates)}")
    if not options.request_rates and any(n < 1 for n in options.concurrency):
        raise ConfigError(f"concurrency levels must be 1 or more, not {list(options.concurrency)}")
    if options.protocol == "stream" and options.batch_size != 1:
        raise ConfigError("the stream protocol sends one frame per request: --batch-size must be 1")
    steps: list[tuple[str, float]] = (
        [("rate", rate) for rate in options.request_rates]
        if options.request_rates
        else [("concurrency", float(n)) for n in options.concurrency]
    )
    frames = source_frames(options.source) if options.protocol == "stream" else []
    results = []
    async with aio_channel(options.target, options.security, channel_options(options.max_message_bytes)) as channel:
        target: KServeTarget | StreamTarget
        if options.protocol == "kserve":
            target = KServeTarget(channel, options)
            await target.prepare()
        else:
            target = StreamTarget(channel, options, frames)
        try:
            try:
                await target.request(0)  # fail fast on a wrong model or input, before any step
            except RequestFailed as exc:
                raise PerfError(f"the first request to {options.target} failed: {exc}") from exc
            for mode, load in steps:
                before = await target.statistics() if isinstance(target, KServeTarget) else None
                step = await _step(target, options, mode, load)
                if isinstance(target, KServeTarget):
                    step = _with_server(step, _server_delta(before, await target.statistics()))
                results.append(step)
        finally:
            await target.close()
    return results


def _with_server(step: StepResult, server_us: dict[str, float]) -> StepResult:
    return StepResult(**{**asdict(step), "server_us": server_us})


def format_table(results: Sequence[StepResult]) -> str:
    header = (
        f"{'load':>14} {'stable':>6} {'infer/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
        f" {'errors':>6} {'server queue/infer us':>22}"
    )
    lines = [header]
    for step in results:
        label = f"concurrency {int(step.load)}" if step.mode == "concurrency" else f"{step.load:g} req/s"
        ms = step.latency_ms
        server = f"{step.server_us['queue']:.0f} / {step.server_us['compute_infer']:.0f}" if step.server_us else "-"
        lines.append(
            f"{label:>14} {'yes' if step.stable else 'no':>6} {step.inferences_per_s:>9.1f}"
            + "".join(f" {ms.get(f'p{p}', float('nan')):>8.2f}" for p in PERCENTILES)
            + f" {step.errors:>6} {server:>22}"
        )
    return "\n".join(lines)


CSV_FIELDS = (
    "mode",
    "load",
    "stable",
    "windows",
    "requests",
    "errors",
    "delayed",
    "requests_per_s",
    "inferences_per_s",
    *(f"p{p}_ms" for p in PERCENTILES),
    "avg_ms",
    "max_ms",
    "server_queue_us",
    "server_compute_input_us",
    "server_compute_infer_us",
    "server_compute_output_us",
)


def write_csv(results: Sequence[StepResult], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for step in results:
            row: dict[str, Any] = {name: getattr(step, name) for name in CSV_FIELDS[:9]}
            row |= {f"{name}_ms": value for name, value in step.latency_ms.items() if f"{name}_ms" in CSV_FIELDS}
            row |= {f"server_{name}_us": value for name, value in step.server_us.items()}
            writer.writerow(row)


def write_json(results: Sequence[StepResult], options: PerfOptions, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"options": asdict(options), "steps": [asdict(step) for step in results]}
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def write_plot(results: Sequence[StepResult], options: PerfOptions, path: Path) -> bool:
    """Latency percentiles against throughput, one point per step; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measured = [step for step in results if step.latency_ms]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for p in PERCENTILES:
        axis.plot(
            [s.inferences_per_s for s in measured], [s.latency_ms[f"p{p}"] for s in measured], marker="o", label=f"p{p}"
        )
    for step in measured:
        label = f"c{int(step.load)}" if step.mode == "concurrency" else f"{step.load:g}/s"
        axis.annotate(label, (step.inferences_per_s, step.latency_ms["p99"]), fontsize=8, xytext=(3, 3),
                      textcoords="offset points")  # fmt: skip
    axis.set_xlabel("throughput (inferences/s)")
    axis.set_ylabel("latency (ms)")
    axis.set_title(f"{options.model} over {options.protocol} at {options.target}")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
