"""tegrastats lines in each documented form, Nano to Thor.

The lines are written for these tests from the formats that NVIDIA's L4T /
Jetson Linux documentation and users' reports give for each generation and
JetPack release (field names, units, separators); they are not captured from
a device. See the docstring of ``edgescope.runtime.telemetry.jetson``.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from edgescope.runtime.telemetry.jetson import TegrastatsReader, parse_tegrastats

MIB = 1024 * 1024
U = -1.0  # unknown: the line does not say

# JetPack 4, Nano: rails in mW without a unit, "cur/avg".
NANO = (
    "RAM 2016/3956MB (lfb 148x4MB) SWAP 0/1978MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [3%@1479,2%@1479,off,off] EMC_FREQ 0%@1600 GR3D_FREQ 46%@921 APE 25 PLL@33C CPU@35.5C "
    "PMIC@100C GPU@33.5C AO@42C thermal@34.25C POM_5V_IN 2093/2093 POM_5V_GPU 412/398 POM_5V_CPU 446/446"
)
# JetPack 4, TX2: the GPU rail is VDD_SYS_GPU.
TX2 = (
    "RAM 3276/7859MB (lfb 5x4MB) SWAP 0/3930MB (cached 0MB) CPU [4%@1420,off,off,2%@1420,1%@1420,3%@1420] "
    "EMC_FREQ 1%@1866 GR3D_FREQ 9%@114 APE 150 PLL@42.5C MCPU@42.5C PMIC@50C Tboard@38C GPU@39.5C "
    "BCPU@42.5C thermal@41.3C Tdiode@39.25C VDD_SYS_GPU 182/182 VDD_SYS_SOC 730/730 VDD_IN 5297/5297"
)
# JetPack 4/5, AGX Xavier: the GPU rail is called GPU.
XAVIER = (
    "RAM 2472/31920MB (lfb 6779x4MB) SWAP 0/15960MB (cached 0MB) "
    "CPU [1%@1190,0%@1190,0%@1190,0%@1190,off,off,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 12%@1377 "
    "APE 150 MTS fg 0% bg 0% AO@32C GPU@32.5C Tdiode@35C PMIC@100C AUX@31.5C CPU@33.5C thermal@32.7C "
    "Tboard@33C GPU 1542/1240 CPU 310/310 SOC 1241/1241 CV 0/0 VDDRQ 155/155 SYS5V 1532/1532"
)
# JetPack 5, AGX Orin: a timestamp first, one clock per GPC, rails with the mW unit.
ORIN_AGX = (
    "11-25-2026 10:15:32 RAM 5421/30593MB (lfb 4x4MB) SWAP 0/15296MB (cached 0MB) "
    "CPU [2%@729,1%@729,0%@729,0%@729,off,off,off,off,off,off,off,off] EMC_FREQ 0%@2133 "
    "GR3D_FREQ 87%@[1300,1300] VIC_FREQ 729 APE 174 CV0@-256C CPU@45.468C Tboard@35C SOC2@42.5C "
    "Tdiode@36.25C SOC0@43.156C CV1@-256C GPU@51.406C tj@51.406C SOC1@42.625C CV2@-256C "
    "VDD_GPU_SOC 9213mW/6393mW VDD_CPU_CV 398mW/398mW VIN_SYS_5V0 3525mW/3525mW NC 0mW/0mW "
    "VDDQ_VDD2_1V8AO 404mW/404mW NC 0mW/0mW"
)
# JetPack 6, Orin Nano: no GPU clock or EMC field, and the GPU zone powered down (-256C).
ORIN_NANO_JP6 = (
    "RAM 2269/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) CPU [0%@729,0%@729,1%@729,0%@729,0%@729,0%@729] "
    "GR3D_FREQ 0% cpu@47.281C soc2@45.625C soc0@46.218C gpu@-256C tj@47.281C soc1@45.562C "
    "VDD_IN 4523mW/4523mW VDD_CPU_GPU_CV 402mW/402mW VDD_SOC 1407mW/1407mW"
)
# JetPack 7, AGX Orin: utilisation with the per-GPC array, "current/highest" temperatures,
# "cur/avg/max" rails.
ORIN_AGX_JP7 = (
    "07-25-2026 09:08:28 RAM 20642/62817MB (lfb 1x2MB) CPU [23%@2201,10%@2201,4%@2201,1%@2201] "
    "EMC_FREQ 3%@3199 GR3D_FREQ 31%@[1300,1236] NVENC0 off NVDEC0 off APE 174 cpu@52.968C/53.5C "
    "soc2@49.1C/49.9C gpu@50.25C/52.0C tj@52.968C/53.5C VDD_GPU_SOC 4012mW/3800mW/5120mW "
    "VDD_CPU_CV 1203mW/1100mW/1500mW VIN_SYS_5V0 4010mW/4000mW/4100mW"
)
# JetPack 7, Thor: GPC clocks without a utilisation (one GPC power-gated), EMC clock without a
# load, the CPU load as "[...]@clock", GPU rail VDD_GPU, rails "cur/avg/max".
THOR = (
    "08-08-2026 20:58:23 RAM 3429/125749MB (lfb 120x4MB) CPU [0%,5%,off,2%]@2601 EMC_FREQ @4266 "
    "GR3D_FREQ @[1574,off,1574] cpu@49.75C/49.75C tj@51.218C/51.218C gpu@50.5C/51.0C "
    "VDD_GPU 6330mW/6100mW/7012mW VDD_CPU_SOC_MSS 9021mW/8800mW/9700mW VIN 28906mW/14453mW/28906mW"
)
# JetPack 7, Thor image whose tegrastats prints no GR3D field at all.
THOR_NO_GR3D = (
    "RAM 8353/125749MB (lfb 90x4MB) CPU [40%,38%,41%]@2601 gpu@62.906C/64.1C "
    "VDD_GPU 37939mW/8660mW/37939mW VIN 124486mW/36487mW/124486mW"
)


@pytest.mark.parametrize(
    ("line", "util", "clock", "emc", "ram", "temp", "power"),
    [
        (NANO, 46.0, 921.0, 1600.0, (2016, 3956), 33.5, 0.412),
        (TX2, 9.0, 114.0, 1866.0, (3276, 7859), 39.5, 0.182),
        (XAVIER, 12.0, 1377.0, 2133.0, (2472, 31920), 32.5, 1.542),
        (ORIN_AGX, 87.0, 1300.0, 2133.0, (5421, 30593), 51.406, 9.213),
        (ORIN_NANO_JP6, 0.0, U, U, (2269, 7620), U, 0.402),
        (ORIN_AGX_JP7, 31.0, 1300.0, 3199.0, (20642, 62817), 50.25, 4.012),
        (THOR, U, 1574.0, 4266.0, (3429, 125749), 50.5, 6.33),
        (THOR_NO_GR3D, U, U, U, (8353, 125749), 62.906, 37.939),
    ],
    ids=["nano", "tx2", "xavier", "orin-agx-jp5", "orin-nano-jp6", "orin-agx-jp7", "thor", "thor-no-gr3d"],
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


@pytest.mark.parametrize(
    ("line", "util", "clock", "power"),
    [
        # A clock that is not a number spoils the clock, not the utilisation.
        ("RAM 100/200MB GR3D_FREQ 45%@[N/A,N/A] VDD_GPU 900mW/800mW", 45.0, U, 0.9),
        ("RAM 100/200MB GR3D_FREQ N/A VDD_GPU 900mW/800mW", U, U, 0.9),
        # An impossible utilisation is dropped; the clock after it is kept.
        ("RAM 100/200MB GR3D_FREQ 250%@612 VDD_GPU 900mW/800mW", U, 612.0, 0.9),
        # Every GPC power-gated: the GPU clock is 0, not unknown.
        ("RAM 100/200MB GR3D_FREQ @[off,off,off] VDD_GPU 0mW/0mW/0mW", U, 0.0, 0.0),
        # A rail in a unit not listed here is unknown; the rest of the line stands.
        ("RAM 100/200MB GR3D_FREQ 5%@[306,612] VDD_GPU 1.5W/2W", 5.0, 612.0, U),
    ],
    ids=["clock-na", "gr3d-na", "util-out-of-range", "gpcs-off", "rail-in-watts"],
)
def test_a_bad_field_spoils_only_itself(line: str, util: float, clock: float, power: float) -> None:
    stats = parse_tegrastats(line)
    assert stats is not None
    assert (stats.gpu_percent, stats.gpu_clock_mhz) == (util, clock)
    assert stats.gpu_power_w == pytest.approx(power)
    assert stats.ram_total_bytes == 200 * MIB


def test_a_line_without_ram_still_gives_the_gpu_fields() -> None:
    stats = parse_tegrastats("GR3D_FREQ @[1000,1000,1000] gpu@44.5C/45C VDD_GPU 5100mW/5000mW/5300mW")
    assert stats is not None
    assert (stats.ram_used_bytes, stats.ram_total_bytes) == (-1, -1)
    assert (stats.gpu_clock_mhz, stats.gpu_temperature_c, stats.gpu_power_w) == (1000.0, 44.5, 5.1)


def test_lines_that_are_not_tegrastats_are_refused() -> None:
    assert parse_tegrastats("") is None
    assert parse_tegrastats("tegrastats: permission denied") is None
    assert parse_tegrastats("SWAP 0/1978MB (cached 0MB) CPU [3%@1479,off] VDD_IN 2093mW/2093mW") is None


def test_reader_runs_tegrastats_and_keeps_the_latest_line(tmp_path: Path) -> None:
    # A stand-in tegrastats that prints recorded lines the way the real one does, one per interval.
    fake = tmp_path / "tegrastats"
    fake.write_text(f"#!/bin/sh\necho '{NANO}'\necho 'garbage'\necho '{THOR}'\nexec sleep 30\n", encoding="utf-8")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    reader = TegrastatsReader(0.1, executable=str(fake))
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            samples = reader.sample()
            if samples and samples[0].sm_clock_mhz == 1574.0:
                break
            time.sleep(0.02)
        (gpu,) = reader.sample()
        # The Thor line, which has no utilisation, still makes a sample with what it has.
        assert gpu.utilization_percent == U
        assert gpu.sm_clock_mhz == 1574.0
        assert gpu.power_w == pytest.approx(6.33)
        assert gpu.memory_total_bytes == 125749 * MIB
    finally:
        reader.close()


def test_reader_without_tegrastats_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        TegrastatsReader(1.0, executable=os.fspath(tmp_path / "missing-tegrastats"))
