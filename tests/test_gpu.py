from __future__ import annotations

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
