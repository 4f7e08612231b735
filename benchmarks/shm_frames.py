"""1080p RGB frames as protobuf bytes vs through shared memory, in one run.

Starts a server in a child process (as on a device: camera client and
runtime are separate processes on one host), streams the same synthetic
1920x1080 RGB frames of the simulated endoscope video to the example model both ways, and
reports end-to-end latency (capture stamp to answer received) p50/p99, the
transport share of it (end to end minus the server's own stages), the
server's decode stage, and frames per second:

- ``paced``: a 30 fps live stream, one frame at a time in the pipeline
  (latency is what a display sees);
- ``fast``: as fast as the server answers (throughput). Here end to end
  also holds the wait in the stream's window, which the ring bounds at its
  4 slots and gRPC flow control bounds at however many 6 MB messages fit:
  compare fps, not latency, in this mode.

Prints a table and writes JSON (+ a PNG plot when matplotlib is present).

    python benchmarks/shm_frames.py [--bundle DIR] [--frames 300] [--out out/bench]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from common import export_example
from replay import ReplaySource

from edgescope.runtime.client.stream import StreamOptions, stream_source
from edgescope.runtime.sources.base import SourceFrame
from edgescope.runtime.sources.endoscopy import SyntheticEndoscopySource
from edgescope.v1 import stream_pb2

ROOT = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT, FPS = 1920, 1080, 30.0
ROUNDS = 3
WARMUP = 5


def endoscopy_frames(count: int, seed: int = 0) -> list[npt.NDArray[np.uint8]]:
    """Frames of the simulated endoscope video, made before the run so the source costs nothing in it."""
    source = SyntheticEndoscopySource(seed=seed, n_frames=count, height=HEIGHT, width=WIDTH)
    return [np.asarray(frame.pixels, dtype=np.uint8) for frame in source]


@dataclass
class Samples:
    """What one transport and pacing measured, pooled over its rounds."""

    transport: str
    pacing: str
    frames: int = 0
    errors: int = 0
    wall_s: float = 0.0
    e2e_ms: list[float] = field(default_factory=list)
    transport_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float:
            return float(np.percentile(values, q))

        return {
            "transport": self.transport,
            "pacing": self.pacing,
            "frames": self.frames,
            "errors": self.errors,
            "fps": self.frames / self.wall_s,
            "e2e_p50_ms": pct(self.e2e_ms, 50),
            "e2e_p99_ms": pct(self.e2e_ms, 99),
            "transport_p50_ms": pct(self.transport_ms, 50),
            "transport_p99_ms": pct(self.transport_ms, 99),
            "decode_p50_ms": pct(self.decode_ms, 50),
        }


def run_round(target: str, source: ReplaySource, samples: Samples) -> None:
    shared, realtime = samples.transport == "shared_memory", samples.pacing == "paced_30fps"
    seen = 0

    def on_result(_frame: SourceFrame, result: stream_pb2.Result) -> None:
        nonlocal seen
        received = time.time_ns()
        seen += 1
        if result.status.code != stream_pb2.FRAME_STATUS_CODE_OK:
            samples.errors += 1
            return
        if seen <= WARMUP:  # connection set-up and ring registration
            return
        e2e = (received - result.capture_time_ns) / 1e6
        server = sum(t.duration_ns for t in result.timings) / 1e6
        samples.e2e_ms.append(e2e)
        # Client to server and back, minus the server's own stages: what the transport costs.
        samples.transport_ms.append(e2e - server)
        samples.decode_ms.extend(t.duration_ns / 1e6 for t in result.timings if t.stage == "decode")

    options = StreamOptions(
        target=target,
        model="lesion-unet",
        realtime=realtime,
        timeout_s=600,
        shared_memory=shared,
        shared_memory_slots=4,
        policy=stream_pb2.STREAM_POLICY_EVERY,
        mask_encoding=stream_pb2.MASK_ENCODING_RLE,
    )
    start = time.perf_counter()
    report = asyncio.run(stream_source(source, options, on_result))
    samples.wall_s += time.perf_counter() - start
    samples.frames += report.sent


def serve(bundle: Path, port_file: Path) -> None:
    """Child process: the server."""
    from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from edgescope.runtime.server.app import ServerConfig, serve

    config = ServerConfig(bundles=[bundle], host="127.0.0.1", port=0, port_file=port_file)
    asyncio.run(serve(config, OnnxRuntimeBackend()))


def plot(results: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['transport']}\n{r['pacing']}" for r in results]
    x = np.arange(len(results))
    axes[0].bar(x - 0.3, [r["e2e_p50_ms"] for r in results], 0.2, label="end-to-end p50")
    axes[0].bar(x - 0.1, [r["e2e_p99_ms"] for r in results], 0.2, label="end-to-end p99")
    axes[0].bar(x + 0.1, [r["transport_p50_ms"] for r in results], 0.2, label="transport p50")
    axes[0].bar(x + 0.3, [r["transport_p99_ms"] for r in results], 0.2, label="transport p99")
    axes[0].set_xticks(x, labels)
    axes[0].set_ylabel("latency (ms)")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].bar(x, [r["fps"] for r in results], color="tab:green")
    axes[1].set_xticks(x, labels)
    axes[1].set_ylabel("frames per second")
    fig.suptitle(f"1920x1080 RGB frames: bytes vs shared memory ({os.cpu_count()} CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a bundle to serve (default: export the example model)")
    parser.add_argument("--frames", type=int, default=300, help="frames per mode")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.port_file)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    # On a shared machine the background load moves every figure; it is recorded with them.
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        bundle = args.bundle or export_example(Path(scratch)).path
        port_file = Path(scratch) / "port"
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(bundle), "--port-file", str(port_file)],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 120
            while not port_file.exists():
                if child.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the benchmark server did not start")
                time.sleep(0.1)
            target = f"127.0.0.1:{port_file.read_text().strip()}"
            source_frames = endoscopy_frames(8)
            modes = [Samples(t, p) for p in ("paced_30fps", "fast") for t in ("bytes", "shared_memory")]
            # Rounds alternate the transports, so both see the same background load.
            per_round = max(args.frames // ROUNDS, WARMUP + 10)
            for round_index in range(ROUNDS):
                for samples in modes:
                    run_round(target, ReplaySource(source_frames, FPS, per_round, "endoscopy"), samples)
                print(f"round {round_index + 1}/{ROUNDS} done", flush=True)
            results = [samples.summary() for samples in modes]
        finally:
            child.terminate()
            child.wait(timeout=30)

    header = ("e2e p50", "e2e p99", "trans p50", "trans p99", "decode", "fps")
    print(f"\n{'transport':<15}{'pacing':<13}" + "".join(f"{h:>11}" for h in header))
    for r in results:
        values = [r[k] for k in ("e2e_p50_ms", "e2e_p99_ms", "transport_p50_ms", "transport_p99_ms", "decode_p50_ms")]
        cells = "".join(f"{v:>9.2f}ms" for v in values)
        print(f"{r['transport']:<15}{r['pacing']:<13}{cells}{r['fps']:>11.1f}")
    summary = {
        "frame": f"{WIDTH}x{HEIGHT} RGB uint8 ({WIDTH * HEIGHT * 3 / 1e6:.1f} MB)",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_1m": [load_before, os.getloadavg()[0]],
        },
        "results": results,
    }
    (args.out / "shm_frames.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    wrote_png = plot(results, args.out / "shm_frames.png")
    print(f"\nwrote {args.out / 'shm_frames.json'}" + (f" and {args.out / 'shm_frames.png'}" if wrote_png else ""))


if __name__ == "__main__":
    main()
