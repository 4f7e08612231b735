"""GPU telemetry through NVML (nvidia-ml-py, imported lazily).

On a machine without an NVIDIA driver or GPU the sampler says so in
``GpuStatus.reason`` and returns no samples; nothing else is affected.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True, slots=True)
class GpuSample:
    index: int
    name: str
    utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_c: float
    power_w: float
    timestamp_s: float


@dataclass(frozen=True, slots=True)
class GpuStatus:
    available: bool
    reason: str
    driver_version: str = ""
    device_count: int = 0


class NvmlSampler:
    """Reads every GPU's state on demand; ``status`` explains an absent GPU."""

    def __init__(self) -> None:
        self._nvml: ModuleType | None = None
        self._handles: list[Any] = []
        self.status = self._initialise()

    def _initialise(self) -> GpuStatus:
        try:
            import pynvml
        except ImportError:
            return GpuStatus(False, "nvidia-ml-py is not installed (pip install nvidia-ml-py)")
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            return GpuStatus(False, f"no NVIDIA GPU telemetry: NVML could not start ({exc})")
        self._nvml = pynvml
        count = pynvml.nvmlDeviceGetCount()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        driver = pynvml.nvmlSystemGetDriverVersion()
        if count == 0:
            return GpuStatus(False, "NVML started but reports no GPU", str(driver), 0)
        return GpuStatus(True, f"{count} NVIDIA GPU(s) via NVML", str(driver), count)

    def sample(self) -> list[GpuSample]:
        nvml = self._nvml
        if nvml is None:
            return []
        now = time.monotonic()
        samples = []
        for index, handle in enumerate(self._handles):
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            samples.append(
                GpuSample(
                    index=index,
                    name=str(nvml.nvmlDeviceGetName(handle)),
                    utilization_percent=float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                    memory_used_bytes=int(memory.used),
                    memory_total_bytes=int(memory.total),
                    temperature_c=float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
                    power_w=nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
                    timestamp_s=now,
                )
            )
        return samples

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None
            self._handles = []
