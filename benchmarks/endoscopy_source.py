"""How fast the simulated endoscope renders 1080p frames on one CPU core.

Pins the process to one core and OpenCV to one thread, renders ``--frames``
frames of ``synthetic:endoscopy`` at 1920x1080 (after its one-time setup,
timed on its own) and reports the median and p95 time per frame and the
frames per second. In the same run, against two baselines: the source's own
30 fps frame period (what it must beat to stream in real time), and the
floor of producing a frame at all, a copy of one 1080p RGB frame.

    python benchmarks/endoscopy_source.py [--frames 300] [--out out/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import cv2
import numpy as np

from edgescope.runtime.sources.endoscopy import SyntheticEndoscopySource

WIDTH, HEIGHT, FPS = 1920, 1080, 30.0


def _pin_to_one_core() -> int:
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    cv2.setNumThreads(1)
    return core


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    args = parser.parse_args()
    core = _pin_to_one_core()

    source = SyntheticEndoscopySource(seed=0, n_frames=args.frames + 1, height=HEIGHT, width=WIDTH)
    frames = iter(source)
    start = time.perf_counter()
    next(frames)  # the first frame includes drawing the tissue and the other one-time tables
    setup_s = time.perf_counter() - start
    times_ms = []
    last = time.perf_counter()
    for _ in frames:
        now = time.perf_counter()
        times_ms.append((now - last) * 1000)
        last = now

    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    copies = []
    for _ in range(50):
        begin = time.perf_counter()
        frame.copy()
        copies.append((time.perf_counter() - begin) * 1000)

    median = statistics.median(times_ms)
    report = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        # Other work on the machine shows here; an idle machine reads near 0.
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "pinned_core": core,
        "opencv_threads": cv2.getNumThreads(),
        "size": f"{WIDTH}x{HEIGHT}",
        "frames": len(times_ms),
        "setup_s": round(setup_s, 3),
        "frame_ms_p50": round(median, 2),
        "frame_ms_p95": round(sorted(times_ms)[int(0.95 * (len(times_ms) - 1))], 2),
        "fps": round(1000.0 / median, 1),
        "baseline_30fps_period_ms": round(1000.0 / FPS, 2),
        "baseline_frame_copy_ms_p50": round(statistics.median(copies), 2),
        "realtime_margin": round((1000.0 / FPS) / median, 2),
    }
    print(f"synthetic:endoscopy {WIDTH}x{HEIGHT} on core {core}, 1 OpenCV thread, {len(times_ms)} frames")
    print(f"  setup (first frame)   {report['setup_s']:8.2f} s")
    print(f"  per frame p50 / p95   {report['frame_ms_p50']:8.2f} / {report['frame_ms_p95']:.2f} ms")
    print(f"  frames per second     {report['fps']:8.1f}   (30 fps needs <= {report['baseline_30fps_period_ms']} ms)")
    print(f"  1080p frame copy p50  {report['baseline_frame_copy_ms_p50']:8.2f} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "endoscopy_source.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
