from __future__ import annotations

import threading
import time

from edgescope.runtime.telemetry.device import DeviceSample, DeviceSampler, open_gpu_reader


def test_background_sampler_reports_host_health_at_its_interval() -> None:
    samples: list[DeviceSample] = []
    enough = threading.Event()

    def collect(sample: DeviceSample) -> None:
        samples.append(sample)
        if len(samples) >= 3:
            enough.set()

    sampler = DeviceSampler(0.05, collect)
    sampler.start()
    try:
        assert enough.wait(timeout=10), "the sampler did not keep sampling"
    finally:
        sampler.close()
    count = len(samples)
    first, *_, last = samples
    assert last.time_ns > first.time_ns
    assert 0 < last.host.process_rss_bytes < last.host.memory_total_bytes
    assert 0 <= last.host.memory_used_bytes <= last.host.memory_total_bytes
    assert 0.0 <= last.host.cpu_percent <= 100.0
    assert last.cost_ns > 0
    # Closed means stopped: nothing arrives afterwards.
    time.sleep(0.2)
    assert len(samples) == count


def test_gpu_absence_is_said_plainly_and_sampling_goes_on() -> None:
    reader, source, status = open_gpu_reader(1.0)
    try:
        if reader is None:
            assert source == "none" and status.startswith("no GPU telemetry")
            sample = DeviceSampler(1.0, lambda _s: None, (reader, source, status)).sample()
            assert sample.gpus == () and sample.gpu_status == status
        else:
            assert source in ("nvml", "tegrastats")
    finally:
        if reader is not None:
            reader.close()
