"""Jetson GPU telemetry from tegrastats (Jetson's integrated GPU has no NVML).

tegrastats prints one line per interval; its fields differ between
generations (Nano/TX: ``POM_5V_GPU 0/0``; Xavier: ``GPU 0/0``; Orin:
``VDD_GPU_SOC 2393mW/2393mW``; JetPack 6 Orin Nano: ``VDD_CPU_GPU_CV``;
temperatures ``GPU@33.5C`` or ``gpu@47.093C``, -256C for a powered-down
zone). ``parse_tegrastats`` reads what is there and leaves the rest at -1.
The GPU shares system RAM, so its memory is the RAM figure.
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

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?(\d+)(?:,\d+)*\]?)?")
_EMC = re.compile(r"\bEMC_FREQ \d+%@(\d+)")
_GPU_TEMP = re.compile(r"\bgpu@(-?[\d.]+)C", re.IGNORECASE)
# Power rails that carry the GPU, newest naming first: "NAME cur/avg" in mW (unit suffix since JetPack 5).
_GPU_RAILS = ("VDD_GPU_SOC", "VDD_CPU_GPU_CV", "POM_5V_GPU", "VDD_GPU", "GPU")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?\b")
# A zone reported at -256C is switched off.
_OFF_ZONE_C = -200.0
JETSON_RELEASE = Path("/etc/nv_tegra_release")


@dataclass(frozen=True, slots=True)
class TegraStats:
    gpu_percent: float
    gpu_clock_mhz: float
    memory_clock_mhz: float
    ram_used_bytes: int
    ram_total_bytes: int
    gpu_temperature_c: float
    gpu_power_w: float


def parse_tegrastats(line: str) -> TegraStats | None:
    """One tegrastats line; None when it is not one (no RAM or GR3D field)."""
    ram = _RAM.search(line)
    gr3d = _GR3D.search(line)
    if ram is None or gr3d is None:
        return None
    emc = _EMC.search(line)
    temp = _GPU_TEMP.search(line)
    temperature = float(temp.group(1)) if temp else -1.0
    rails = {m.group(1): int(m.group(2)) for m in _RAIL.finditer(line)}
    power_mw = next((rails[name] for name in _GPU_RAILS if name in rails), -1000)
    return TegraStats(
        gpu_percent=float(gr3d.group(1)),
        gpu_clock_mhz=float(gr3d.group(2)) if gr3d.group(2) else -1.0,
        memory_clock_mhz=float(emc.group(1)) if emc else -1.0,
        ram_used_bytes=int(ram.group(1)) * 1024 * 1024,
        ram_total_bytes=int(ram.group(2)) * 1024 * 1024,
        gpu_temperature_c=temperature if temperature > _OFF_ZONE_C else -1.0,
        gpu_power_w=power_mw / 1000.0,
    )


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
