from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from edgescope.runtime.telemetry.gpu import NvmlSampler


def test_sampler_reports_its_state_and_never_raises() -> None:
    sampler = NvmlSampler()
    try:
        samples = sampler.sample()
        assert sampler.status.reason
        if sampler.status.available:
            assert len(samples) == sampler.status.device_count
        else:
            assert samples == []
            assert "NVML" in sampler.status.reason or "nvidia-ml-py" in sampler.status.reason
    finally:
        sampler.close()


@pytest.mark.gpu
def test_nvml_reads_plausible_values() -> None:
    sampler = NvmlSampler()
    try:
        (first, *_) = sampler.sample()
        assert first.name
        assert 0 < first.memory_used_bytes <= first.memory_total_bytes
        assert 0.0 <= first.utilization_percent <= 100.0
        assert 0.0 < first.temperature_c < 120.0
        assert first.power_w > 0.0
    finally:
        sampler.close()


class _FakeNvml:
    """The slice of pynvml the sampler calls, for a GPU that is power-capped, hot, and has no ECC."""

    class NVMLError(Exception):
        pass

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_VOLATILE_ECC = 0
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    nvmlClocksThrottleReasonSwPowerCap = 0x4
    nvmlClocksThrottleReasonSwThermalSlowdown = 0x20

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.shut_down = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.65"

    def nvmlDeviceGetName(self, handle: str) -> str:
        return "NVIDIA RTX A2000"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(used=3 * 2**30, total=6 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(gpu=71)

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        return 88

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        return 69_500

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: str) -> int:
        return 70_000

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> int:
        return {1: 1200, 2: 6000}[clock]

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: str) -> int:
        return 0x4 | 0x20

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=self.pid, usedGpuMemory=512 * 2**20), SimpleNamespace(pid=1, usedGpuMemory=2**30)]

    def nvmlDeviceGetTotalEccErrors(self, handle: str, error_type: int, counter: int) -> int:
        raise self.NVMLError("Not Supported")


def test_nvml_reader_reads_every_field_and_tolerates_unsupported_ones() -> None:
    fake = _FakeNvml(os.getpid())
    sampler = NvmlSampler(nvml=fake)
    (gpu,) = sampler.sample()
    assert sampler.status.available and sampler.status.driver_version == "580.65"
    assert gpu.name == "NVIDIA RTX A2000"
    assert gpu.utilization_percent == 71.0
    assert (gpu.memory_used_bytes, gpu.memory_total_bytes) == (3 * 2**30, 6 * 2**30)
    assert gpu.process_memory_bytes == 512 * 2**20  # only this process's share
    assert (gpu.power_w, gpu.power_limit_w) == (69.5, 70.0)
    assert (gpu.sm_clock_mhz, gpu.memory_clock_mhz) == (1200.0, 6000.0)
    assert set(gpu.throttle_reasons) == {"sw_power_cap", "sw_thermal_slowdown"}
    assert (gpu.ecc_corrected, gpu.ecc_uncorrected) == (-1, -1)
    sampler.close()
    assert fake.shut_down and sampler.sample() == []


@pytest.mark.gpu
def test_nvml_reads_clocks_limits_and_this_process() -> None:
    sampler = NvmlSampler()
    try:
        (first, *_) = sampler.sample()
        assert first.sm_clock_mhz > 0 and first.memory_clock_mhz > 0
        assert first.power_limit_w >= first.power_w * 0.5
        assert all(reason.islower() for reason in first.throttle_reasons)
        assert first.process_memory_bytes >= 0
    finally:
        sampler.close()
