"""tegrastats lines as each Jetson generation prints them (formats from NVIDIA's L4T docs and user reports)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from edgescope.runtime.telemetry.jetson import TegrastatsReader, parse_tegrastats

MIB = 1024 * 1024

NANO = (
    "RAM 2016/3956MB (lfb 148x4MB) SWAP 0/1978MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [3%@1479,2%@1479,off,off] EMC_FREQ 0%@1600 GR3D_FREQ 46%@921 APE 25 PLL@33C CPU@35.5C "
    "PMIC@100C GPU@33.5C AO@42C thermal@34.25C POM_5V_IN 2093/2093 POM_5V_GPU 412/398 POM_5V_CPU 446/446"
)
XAVIER = (
    "RAM 2472/31920MB (lfb 6779x4MB) SWAP 0/15960MB (cached 0MB) "
    "CPU [1%@1190,0%@1190,0%@1190,0%@1190,off,off,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 12%@1377 "
    "APE 150 MTS fg 0% bg 0% AO@32C GPU@32.5C Tdiode@35C PMIC@100C AUX@31.5C CPU@33.5C thermal@32.7C "
    "Tboard@33C GPU 1542/1240 CPU 310/310 SOC 1241/1241 CV 0/0 VDDRQ 155/155 SYS5V 1532/1532"
)
ORIN_AGX = (
    "11-25-2026 10:15:32 RAM 5421/30593MB (lfb 4x4MB) SWAP 0/15296MB (cached 0MB) "
    "CPU [2%@729,1%@729,0%@729,0%@729,off,off,off,off,off,off,off,off] EMC_FREQ 0%@2133 "
    "GR3D_FREQ 87%@[1300,1300] VIC_FREQ 729 APE 174 CV0@-256C CPU@45.468C Tboard@35C SOC2@42.5C "
    "Tdiode@36.25C SOC0@43.156C CV1@-256C GPU@51.406C tj@51.406C SOC1@42.625C CV2@-256C "
    "VDD_GPU_SOC 9213mW/6393mW VDD_CPU_CV 398mW/398mW VIN_SYS_5V0 3525mW/3525mW NC 0mW/0mW "
    "VDDQ_VDD2_1V8AO 404mW/404mW NC 0mW/0mW"
)
ORIN_NANO_JP6 = (
    "RAM 2269/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) CPU [0%@729,0%@729,1%@729,0%@729,0%@729,0%@729] "
    "GR3D_FREQ 0% cpu@47.281C soc2@45.625C soc0@46.218C gpu@-256C tj@47.281C soc1@45.562C "
    "VDD_IN 4523mW/4523mW VDD_CPU_GPU_CV 402mW/402mW VDD_SOC 1407mW/1407mW"
)


@pytest.mark.parametrize(
    ("line", "util", "clock", "emc", "ram", "temp", "power"),
    [
        (NANO, 46.0, 921.0, 1600.0, (2016, 3956), 33.5, 0.412),
        (XAVIER, 12.0, 1377.0, 2133.0, (2472, 31920), 32.5, 1.542),
        (ORIN_AGX, 87.0, 1300.0, 2133.0, (5421, 30593), 51.406, 9.213),
        # JetPack 6: no GPU clock or EMC field, and the GPU zone powered down (-256C).
        (ORIN_NANO_JP6, 0.0, -1.0, -1.0, (2269, 7620), -1.0, 0.402),
    ],
    ids=["nano", "xavier", "orin-agx", "orin-nano-jp6"],
)
def test_parses_each_generations_line(
    line: str, util: float, clock: float, emc: float, ram: tuple[int, int], temp: float, power: float
) -> None:
    stats = parse_tegrastats(line)
    assert stats is not None
    assert stats.gpu_percent == util
    assert stats.gpu_clock_mhz == clock
    assert stats.memory_clock_mhz == emc
    assert (stats.ram_used_bytes, stats.ram_total_bytes) == (ram[0] * MIB, ram[1] * MIB)
    assert stats.gpu_temperature_c == pytest.approx(temp)
    assert stats.gpu_power_w == pytest.approx(power)


def test_lines_that_are_not_tegrastats_are_refused() -> None:
    assert parse_tegrastats("") is None
    assert parse_tegrastats("tegrastats: permission denied") is None
    assert parse_tegrastats("RAM 2016/3956MB (lfb 148x4MB) SWAP 0/1978MB") is None


def test_reader_runs_tegrastats_and_keeps_the_latest_line(tmp_path: Path) -> None:
    # A stand-in tegrastats that prints recorded lines the way the real one does, one per interval.
    fake = tmp_path / "tegrastats"
    fake.write_text(f"#!/bin/sh\necho '{NANO}'\necho 'garbage'\necho '{ORIN_AGX}'\nexec sleep 30\n", encoding="utf-8")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    reader = TegrastatsReader(0.1, executable=str(fake))
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            samples = reader.sample()
            if samples and samples[0].utilization_percent == 87.0:
                break
            time.sleep(0.02)
        (gpu,) = reader.sample()
        assert gpu.utilization_percent == 87.0
        assert gpu.sm_clock_mhz == 1300.0
        assert gpu.memory_total_bytes == 30593 * MIB
    finally:
        reader.close()


def test_reader_without_tegrastats_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        TegrastatsReader(1.0, executable=os.fspath(tmp_path / "missing-tegrastats"))
