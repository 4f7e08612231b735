"""GPU telemetry through NVML (nvidia-ml-py, imported lazily).

On a machine without an NVIDIA driver or GPU the sampler says so in
``GpuStatus.reason`` and returns no samples; nothing else is affected.
Fields a GPU does not support (ECC on consumer boards, power on some
embedded parts) read as -1 or empty rather than failing the sample.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

# NVML's clocks-event (throttle) reason bits, by the names operators know.
THROTTLE_REASONS: tuple[tuple[str, str], ...] = (
    ("nvmlClocksThrottleReasonGpuIdle", "gpu_idle"),
    ("nvmlClocksThrottleReasonApplicationsClocksSetting", "applications_clocks_setting"),
    ("nvmlClocksThrottleReasonSwPowerCap", "sw_power_cap"),
    ("nvmlClocksThrottleReasonHwSlowdown", "hw_slowdown"),
    ("nvmlClocksThrottleReasonSyncBoost", "sync_boost"),
    ("nvmlClocksThrottleReasonSwThermalSlowdown", "sw_thermal_slowdown"),
    ("nvmlClocksThrottleReasonHwThermalSlowdown", "hw_thermal_slowdown"),
    ("nvmlClocksThrottleReasonHwPowerBrakeSlowdown", "hw_power_brake_slowdown"),
    ("nvmlClocksThrottleReasonDisplayClockSetting", "display_clock_setting"),
)
THERMAL_THROTTLE = frozenset({"sw_thermal_slowdown", "hw_thermal_slowdown"})
POWER_THROTTLE = frozenset({"sw_power_cap", "hw_power_brake_slowdown"})


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
    process_memory_bytes: int = 0
    power_limit_w: float = -1.0
    sm_clock_mhz: float = -1.0
    memory_clock_mhz: float = -1.0
    throttle_reasons: tuple[str, ...] = ()
    ecc_corrected: int = -1
    ecc_uncorrected: int = -1


@dataclass(frozen=True, slots=True)
class GpuStatus:
    available: bool
    reason: str
    driver_version: str = ""
    device_count: int = 0


class NvmlSampler:
    """Reads every GPU's state on demand; ``status`` explains an absent GPU.

    ``nvml`` replaces the ``pynvml`` module (tests pass a fake one).
    """

    def __init__(self, nvml: Any = None) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._pid = os.getpid()
        self.status = self._initialise(nvml)

    def _initialise(self, nvml: Any) -> GpuStatus:
        if nvml is None:
            try:
                import pynvml
            except ImportError:
                return GpuStatus(False, "nvidia-ml-py is not installed (pip install nvidia-ml-py)")
            nvml = pynvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            return GpuStatus(False, f"no NVIDIA GPU telemetry: NVML could not start ({exc})")
        self._nvml = nvml
        count = nvml.nvmlDeviceGetCount()
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        driver = nvml.nvmlSystemGetDriverVersion()
        if count == 0:
            return GpuStatus(False, "NVML started but reports no GPU", str(driver), 0)
        return GpuStatus(True, f"{count} NVIDIA GPU(s) via NVML", str(driver), count)

    def _optional(self, call: str, default: Any, *args: Any) -> Any:
        """A field the GPU may not support: NVML raises (NotSupported, NoPermission) instead of answering."""
        try:
            return getattr(self._nvml, call)(*args)
        except self._nvml.NVMLError:
            return default

    def _throttle_reasons(self, handle: Any) -> tuple[str, ...]:
        mask = int(self._optional("nvmlDeviceGetCurrentClocksThrottleReasons", 0, handle))
        return tuple(name for attr, name in THROTTLE_REASONS if mask & int(getattr(self._nvml, attr, 0)))

    def _process_memory(self, handle: Any) -> int:
        processes = self._optional("nvmlDeviceGetComputeRunningProcesses", [], handle)
        # usedGpuMemory is None where the driver hides per-process figures (e.g. in containers).
        return sum(int(p.usedGpuMemory or 0) for p in processes if p.pid == self._pid)

    def _ecc(self, handle: Any, error_type: int) -> int:
        nvml = self._nvml
        return int(self._optional("nvmlDeviceGetTotalEccErrors", -1, handle, error_type, nvml.NVML_VOLATILE_ECC))

    def sample(self) -> list[GpuSample]:
        nvml = self._nvml
        if nvml is None:
            return []
        now = time.monotonic()
        samples = []
        for index, handle in enumerate(self._handles):
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            limit_mw = float(self._optional("nvmlDeviceGetEnforcedPowerLimit", -1000, handle))
            power_mw = float(self._optional("nvmlDeviceGetPowerUsage", -1000, handle))
            samples.append(
                GpuSample(
                    index=index,
                    name=str(nvml.nvmlDeviceGetName(handle)),
                    utilization_percent=float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                    memory_used_bytes=int(memory.used),
                    memory_total_bytes=int(memory.total),
                    temperature_c=float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
                    power_w=power_mw / 1000.0,
                    timestamp_s=now,
                    process_memory_bytes=self._process_memory(handle),
                    power_limit_w=limit_mw / 1000.0,
                    sm_clock_mhz=float(self._optional("nvmlDeviceGetClockInfo", -1, handle, nvml.NVML_CLOCK_SM)),
                    memory_clock_mhz=float(self._optional("nvmlDeviceGetClockInfo", -1, handle, nvml.NVML_CLOCK_MEM)),
                    throttle_reasons=self._throttle_reasons(handle),
                    ecc_corrected=self._ecc(handle, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
                    ecc_uncorrected=self._ecc(handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
                )
            )
        return samples

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None
            self._handles = []
