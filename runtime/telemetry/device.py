"""Device health sampled in the background: GPU (NVML or tegrastats), CPU, memory, process RSS.

The sampler picks NVML where an NVIDIA driver answers, tegrastats on a
Jetson, and otherwise reports plainly that there is no GPU telemetry; CPU
and memory figures come from psutil everywhere. Each sample records what it
cost to take, so the overhead of watching the device is itself visible.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import psutil

from edgescope.runtime.telemetry.gpu import GpuSample, NvmlSampler
from edgescope.runtime.telemetry.jetson import TegrastatsReader, is_jetson

logger = logging.getLogger(__name__)


class GpuReader(Protocol):
    def sample(self) -> list[GpuSample]: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class HostSample:
    cpu_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    process_rss_bytes: int


@dataclass(frozen=True, slots=True)
class DeviceSample:
    # "nvml", "tegrastats" or "none".
    gpu_source: str
    gpu_status: str
    gpus: tuple[GpuSample, ...]
    host: HostSample
    cost_ns: int
    time_ns: int


def open_gpu_reader(interval_s: float) -> tuple[GpuReader | None, str, str]:
    """The best GPU reader here, its source name, and a plain sentence on what was found."""
    nvml = NvmlSampler()
    if nvml.status.available:
        return nvml, "nvml", nvml.status.reason
    nvml.close()
    if is_jetson():
        try:
            return TegrastatsReader(interval_s), "tegrastats", "Jetson integrated GPU via tegrastats"
        except OSError as exc:
            return None, "none", f"Jetson detected but tegrastats cannot run ({exc}); no GPU telemetry"
    reason = nvml.status.reason.removeprefix("no NVIDIA GPU telemetry: ")
    return None, "none", f"no GPU telemetry: {reason}; not a Jetson"


class DeviceSampler:
    """Samples every ``interval_s`` on a daemon thread and hands each sample to ``on_sample``."""

    def __init__(
        self,
        interval_s: float,
        on_sample: Callable[[DeviceSample], None],
        gpu: tuple[GpuReader | None, str, str] | None = None,
    ) -> None:
        self.interval_s = interval_s
        self._on_sample = on_sample
        self._gpu, self.gpu_source, self.gpu_status = gpu if gpu is not None else open_gpu_reader(interval_s)
        self._process = psutil.Process()
        # The first cpu_percent call only sets psutil's baseline.
        psutil.cpu_percent(interval=None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> DeviceSample:
        start = time.perf_counter_ns()
        gpus = tuple(self._gpu.sample()) if self._gpu is not None else ()
        memory = psutil.virtual_memory()
        host = HostSample(
            cpu_percent=float(psutil.cpu_percent(interval=None)),
            memory_used_bytes=int(memory.total - memory.available),
            memory_total_bytes=int(memory.total),
            process_rss_bytes=int(self._process.memory_info().rss),
        )
        cost = time.perf_counter_ns() - start
        return DeviceSample(self.gpu_source, self.gpu_status, gpus, host, cost, time.time_ns())

    def start(self) -> None:
        self._on_sample(self.sample())
        self._thread = threading.Thread(target=self._run, name="edgescope-device-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._on_sample(self.sample())
            except Exception:
                # A failing read must not end device monitoring for the rest of the run.
                logger.exception("device sample failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None
