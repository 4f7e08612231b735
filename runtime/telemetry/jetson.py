"""Jetson GPU telemetry from tegrastats (Jetson's integrated GPU has no NVML).

tegrastats prints one line per interval. Its fields differ between
generations and JetPack releases; these forms are read:

- GPU engine: ``GR3D_FREQ 46%@921`` (Nano, TX2, Xavier, JetPack 5 Orin),
  ``GR3D_FREQ 87%@[1300,1300]`` (Orin, one clock per GPC), ``GR3D_FREQ 0%``
  (JetPack 6 Orin Nano: no clock), ``GR3D_FREQ @[1574,1574,1574]`` (Thor,
  JetPack 7: per-GPC clocks and no utilisation); a GPC may read ``off``.
  Some Thor images print no GR3D field at all.
- Memory clock: ``EMC_FREQ 0%@2133``, ``EMC_FREQ @4266`` (Thor), ``EMC_FREQ 3%``.
- GPU temperature: ``GPU@33.5C``, ``gpu@47.093C``, ``gpu@51.218C/51.218C``
  (JetPack 7: current and highest); -256C marks a powered-down zone.
- Power rails, milliwatts: ``POM_5V_GPU 412/398`` (no unit, current/average;
  Nano, TX2, Xavier), ``VDD_GPU_SOC 9213mW/6393mW`` (JetPack 5/6 Orin) and
  ``VDD_GPU 6330mW/6330mW/6330mW`` (JetPack 7: current/average/highest).
  The rail that carries the GPU is named per module (``_GPU_RAILS``).

``parse_tegrastats`` reads each field on its own: a field that is missing
or in a form not listed here is left unknown (-1) and the rest of the line
still makes a sample. The GPU shares system RAM, so its memory is the RAM
figure.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgescope.runtime.telemetry.gpu import GpuSample

UNKNOWN = -1.0
_MIB = 1024 * 1024
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB\b")
# "NAME [P%][@CLOCK | @[CLOCK,CLOCK,...]]": each part optional, so one missing part spoils nothing else.
_ENGINE = r"\b{name}\s+(?:(\d+(?:\.\d+)?)%)?(?:@(\[[^\]]*\]|\d+(?:\.\d+)?))?"
_GR3D = re.compile(_ENGINE.format(name="GR3D_FREQ"))
_EMC = re.compile(_ENGINE.format(name="EMC_FREQ"))
_GPU_TEMP = re.compile(r"\bgpu@(-?\d+(?:\.\d+)?)C", re.IGNORECASE)
# "NAME cur/avg" or "NAME cur/avg/max", each value in mW with or without the unit.
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+(?:\.\d+)?)(?:mW)?/\d+(?:\.\d+)?(?:mW)?(?:/\d+(?:\.\d+)?(?:mW)?)?(?=\s|$)")
# The rail that carries the GPU, by module: AGX Orin, Thor, Orin NX/Nano, TX2, Nano, AGX Xavier.
_GPU_RAILS = ("VDD_GPU_SOC", "VDD_GPU", "VDD_CPU_GPU_CV", "VDD_SYS_GPU", "POM_5V_GPU", "GPU")
# A zone reported at -256C is switched off.
_OFF_ZONE_C = -200.0
JETSON_RELEASE = Path("/etc/nv_tegra_release")


@dataclass(frozen=True, slots=True)
class TegraStats:
    """One line's figures; -1 where the line did not say."""

    gpu_percent: float = UNKNOWN
    gpu_clock_mhz: float = UNKNOWN
    memory_clock_mhz: float = UNKNOWN
    ram_used_bytes: int = -1
    ram_total_bytes: int = -1
    gpu_temperature_c: float = UNKNOWN
    gpu_power_w: float = UNKNOWN


def parse_tegrastats(line: str) -> TegraStats | None:
    """One tegrastats line; None when it holds none of the fields read here."""
    ram = _RAM.search(line)
    gr3d = _GR3D.search(line)
    emc = _EMC.search(line)
    temp = _GPU_TEMP.search(line)
    rails = {m.group(1): float(m.group(2)) for m in _RAIL.finditer(line)}
    gpu_rail = next((name for name in _GPU_RAILS if name in rails), None)
    if ram is None and gr3d is None and temp is None and gpu_rail is None:
        return None
    gpu_percent, gpu_clock = _engine(gr3d)
    _, memory_clock = _engine(emc)
    temperature = float(temp.group(1)) if temp else UNKNOWN
    return TegraStats(
        gpu_percent=gpu_percent,
        gpu_clock_mhz=gpu_clock,
        memory_clock_mhz=memory_clock,
        ram_used_bytes=int(ram.group(1)) * _MIB if ram else -1,
        ram_total_bytes=int(ram.group(2)) * _MIB if ram else -1,
        gpu_temperature_c=temperature if temperature > _OFF_ZONE_C else UNKNOWN,
        gpu_power_w=rails[gpu_rail] / 1000.0 if gpu_rail is not None else UNKNOWN,
    )


def _engine(match: re.Match[str] | None) -> tuple[float, float]:
    """(utilisation %, clock MHz) of an engine field; a per-GPC array gives its fastest GPC."""
    if match is None:
        return UNKNOWN, UNKNOWN
    percent = float(match.group(1)) if match.group(1) is not None else UNKNOWN
    if percent > 100.0:
        percent = UNKNOWN
    clock = match.group(2)
    if clock is None:
        return percent, UNKNOWN
    if not clock.startswith("["):
        return percent, float(clock)
    clocks = [_gpc_clock(entry.strip()) for entry in clock[1:-1].split(",")]
    known = [c for c in clocks if c is not None]
    return percent, max(known) if known else UNKNOWN


def _gpc_clock(entry: str) -> float | None:
    if entry == "off":  # a power-gated GPC runs no clock
        return 0.0
    try:
        return float(entry)
    except ValueError:
        return None


def is_jetson() -> bool:
    return JETSON_RELEASE.exists()


class TegrastatsReader:
    """Runs ``tegrastats --interval MS`` and keeps its latest parsed line."""

    def __init__(self, interval_s: float, executable: str = "tegrastats") -> None:
        path = shutil.which(executable)
        if path is None:
            raise FileNotFoundError(f"{executable} not found on PATH")
        self._process = subprocess.Popen(
            [path, "--interval", str(max(1, round(interval_s * 1000)))],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._latest: TegraStats | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, name="edgescope-tegrastats", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        stdout = self._process.stdout
        if stdout is None:
            return
        for line in stdout:
            parsed = parse_tegrastats(line)
            if parsed is not None:
                with self._lock:
                    self._latest = parsed

    def sample(self) -> list[GpuSample]:
        with self._lock:
            stats = self._latest
        if stats is None:
            return []
        return [
            GpuSample(
                index=0,
                name="Jetson iGPU",
                utilization_percent=stats.gpu_percent,
                memory_used_bytes=stats.ram_used_bytes,
                memory_total_bytes=stats.ram_total_bytes,
                temperature_c=stats.gpu_temperature_c,
                power_w=stats.gpu_power_w,
                timestamp_s=time.monotonic(),
                sm_clock_mhz=stats.gpu_clock_mhz,
                memory_clock_mhz=stats.memory_clock_mhz,
            )
        ]

    def close(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=5)
        self._thread.join(timeout=5)
        if self._process.stdout is not None:
            self._process.stdout.close()
