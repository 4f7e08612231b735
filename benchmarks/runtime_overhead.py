"""Runtime overhead, throughput, live latency and memory, against two baselines, in one run.

Same frames (the 120-frame echo cine from pydicom-data, decoded once and
looped) and the same model (the example lesion U-Net) throughout:

- raw: the ONNX Runtime session in a tight loop on preprocessed tensors
  (the limit no server can beat);
- torch-unary: a plain gRPC unary server that runs the PyTorch model per
  request (what a team would otherwise write);
- edgescope: ``edgescope serve`` streamed as fast as possible (every), at the
  cine's 30 fps (live), and for a long run sampling the server's RSS.

Prints a table, writes ``benchmarks/results/runtime_overhead.json`` and a PNG.
Run: ``.venv/bin/python benchmarks/runtime_overhead.py [--quick]``.
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
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from replay import ReplaySource

from edgescope.bundle import load_bundle
from edgescope.export import ExportRequest, export_model
from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgescope.runtime.client.demo import start_server, stop_server
from edgescope.runtime.client.stream import StreamOptions, stream_source
from edgescope.runtime.pipeline.preprocess import preprocess
from edgescope.runtime.sources import SourceFrame, open_source
from edgescope.v1 import stream_pb2

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ultrasound_unet"
RESULTS = ROOT / "benchmarks" / "results"


def percentiles(values_ms: list[float]) -> dict[str, float]:
    data = np.asarray(values_ms)
    return {
        "p50_ms": round(float(np.percentile(data, 50)), 3),
        "p99_ms": round(float(np.percentile(data, 99)), 3),
        "max_ms": round(float(data.max()), 3),
    }


def bench_raw(bundle_path: Path, frames: list[SourceFrame], count: int) -> dict[str, Any]:
    bundle = load_bundle(bundle_path)
    session = OnnxRuntimeBackend().load(bundle)
    tensors = [preprocess(f.pixels, bundle.manifest.preprocessing)[0] for f in frames]
    name = bundle.manifest.inputs[0].name
    session.infer({name: tensors[0]})
    times = []
    start = time.perf_counter()
    for index in range(count):
        begin = time.perf_counter()
        session.infer({name: tensors[index % len(tensors)]})
        times.append((time.perf_counter() - begin) * 1e3)
    elapsed = time.perf_counter() - start
    session.close()
    return {"frames": count, "fps": round(count / elapsed, 2), **percentiles(times)}


_TORCH_SERVER = r"""
import sys, grpc, numpy as np, torch, cv2
from concurrent import futures
sys.path.insert(0, sys.argv[2])
from model import build
torch.set_num_threads(2)
model = build(); model.load_state_dict(torch.load(sys.argv[3], weights_only=True)); model.eval()
def infer(request, context):
    h, w = int.from_bytes(request[:4], "little"), int.from_bytes(request[4:8], "little")
    rgb = np.frombuffer(request[8:], np.uint8).reshape(h, w, 3)
    gray = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (256, 256), interpolation=cv2.INTER_AREA)
    with torch.inference_mode():
        logits = model(torch.from_numpy(gray[None, None].astype(np.float32) / 255.0))[0, 0].numpy()
    mask = cv2.resize((logits > 0).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    return cv2.imencode(".png", mask)[1].tobytes()
server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 64 << 20)])
handler = grpc.method_handlers_generic_handler("plain.Seg", {"Infer": grpc.unary_unary_rpc_method_handler(infer)})
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"""


def bench_torch_unary(frames: list[SourceFrame], count: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "plain_server.py"
        script.write_text(_TORCH_SERVER)
        server = subprocess.Popen(
            [sys.executable, str(script), "", str(EXAMPLE), str(EXAMPLE / "weights.pt")],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
            call = channel.unary_unary("/plain.Seg/Infer")
            payloads = []
            for frame in frames:
                rgb = frame.pixels if frame.pixels.ndim == 3 else np.stack([frame.pixels] * 3, axis=-1)
                h, w = rgb.shape[:2]
                payloads.append(h.to_bytes(4, "little") + w.to_bytes(4, "little") + rgb.tobytes())
            call(payloads[0], timeout=30)
            times = []
            start = time.perf_counter()
            for index in range(count):
                begin = time.perf_counter()
                call(payloads[index % len(payloads)], timeout=30)
                times.append((time.perf_counter() - begin) * 1e3)
            elapsed = time.perf_counter() - start
            channel.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    return {"frames": count, "fps": round(count / elapsed, 2), **percentiles(times)}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


def bench_edgescope(
    bundle_path: Path, frames: list[SourceFrame], fps: float, fast_count: int, live_count: int, soak_count: int
) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def replay(count: int) -> ReplaySource:
        return ReplaySource([f.pixels for f in frames], fps, count, "ultrasound", frames[0].spacing_mm)

    def measure(options: StreamOptions, count: int) -> dict[str, Any]:
        """Stream ``count`` frames; latency of the answered frames, and the throughput."""
        e2e: list[float] = []
        infer: list[float] = []

        def per_frame(_frame: SourceFrame, result: stream_pb2.Result) -> None:
            if result.status.code == stream_pb2.FRAME_STATUS_CODE_OK:
                e2e.append((time.time_ns() - result.capture_time_ns) / 1e6)
                infer.append(next(t.duration_ns for t in result.timings if t.stage == "infer") / 1e6)

        start = time.perf_counter()
        report = asyncio.run(stream_source(replay(count), options, per_frame))
        elapsed = time.perf_counter() - start
        return {
            "frames": report.sent,
            "fps": round(report.sent / elapsed, 2),
            "end_to_end": percentiles(e2e),
            "infer": percentiles(infer),
            "overhead": percentiles([total - model for total, model in zip(e2e, infer, strict=True)]),
            "dropped": report.latency.dropped,
            "errors": report.latency.errors,
        }

    with tempfile.TemporaryDirectory() as tmp:
        server, target = start_server([bundle_path], Path(tmp) / "port")
        try:
            # A window of 3 frames keeps every stage busy without queueing frames in transport buffers.
            options = StreamOptions(target=target, model="", realtime=False, max_in_flight=3)
            results["fast"] = measure(options, fast_count)
            live = StreamOptions(target=target, model="", realtime=True, policy=stream_pb2.STREAM_POLICY_LIVE)
            results["live_30fps"] = measure(live, live_count)
            # The same live stream with frames handed over in shared memory instead of protobuf bytes.
            live.shared_memory = True
            results["live_30fps_shared_memory"] = measure(live, live_count)

            rss: list[tuple[int, float]] = [(0, _rss_mb(server.pid))]
            step = max(1, soak_count // 20)

            def sample_rss(source_frame: SourceFrame, result: stream_pb2.Result) -> None:
                if (source_frame.index + 1) % step == 0:
                    rss.append((source_frame.index + 1, _rss_mb(server.pid)))

            asyncio.run(stream_source(replay(soak_count), options, sample_rss))
            # The first samples include allocator warm-up; flatness is judged after it.
            settled = [mb for index, mb in rss if index >= soak_count // 10]
            results["soak"] = {
                "frames": soak_count,
                "rss_mb": [(index, round(mb, 1)) for index, mb in rss],
                "rss_growth_after_warmup_mb": round(max(settled) - min(settled), 2) if settled else None,
            }
        finally:
            stop_server(server)
    return results


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["raw", "torch-unary", "edgescope fast", "edgescope live"]
    rows = [
        report["raw"],
        report["torch_unary"],
        report["edgescope"]["fast"]["end_to_end"],
        report["edgescope"]["live_30fps"]["end_to_end"],
    ]
    left.bar([n + "\np50" for n in names], [r["p50_ms"] for r in rows], color="#4c72b0")
    left.bar([n + "\np99" for n in names], [r["p99_ms"] for r in rows], color="#dd8452")
    left.set_ylabel("latency (ms)")
    left.tick_params(axis="x", labelsize=7, labelrotation=35)
    soak = report["edgescope"]["soak"]["rss_mb"]
    right.plot([i for i, _ in soak], [mb for _, mb in soak], marker="o")
    right.set_xlabel("frames")
    right.set_ylabel("server RSS (MB)")
    fig.suptitle(f"edgescope runtime on {report['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    args = parser.parse_args()
    counts = (200, 100, 150, 2000) if args.quick else (1000, 300, 300, 20000)
    raw_n, torch_n, live_n, soak_n = counts
    fast_n = raw_n

    from pydicom.data import get_testdata_file

    cine = get_testdata_file("color3d_jpeg_baseline.dcm")
    with open_source(f"dicom:{cine}") as source:
        frames, fps = list(source), source.fps
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "lesion-unet"
        export_model(
            ExportRequest(
                name="lesion-unet",
                output=bundle,
                factory=f"{EXAMPLE / 'model.py'}:build",
                weights=EXAMPLE / "weights.pt",
                samples=4,
            ),
            log=lambda _line: None,
        )
        raw = bench_raw(bundle, frames, raw_n)
        torch_unary = bench_torch_unary(frames, torch_n)
        edgescope = bench_edgescope(bundle, frames, fps, fast_n, live_n, soak_n)

    fast = edgescope["fast"]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, CPU only",
        "frames": "color3d_jpeg_baseline.dcm, 480x640 RGB, model input 256x256 gray",
        "raw": raw,
        "torch_unary": torch_unary,
        "edgescope": edgescope,
        "targets": {
            # Overhead is judged at the live rate, where no frame waits for another.
            "overhead_p50_ms (< 1.5)": edgescope["live_30fps"]["overhead"]["p50_ms"],
            "overhead_p50_ms_shared_memory (< 1.5)": edgescope["live_30fps_shared_memory"]["overhead"]["p50_ms"],
            "throughput_vs_raw (>= 0.9)": round(fast["fps"] / raw["fps"], 3),
            "throughput_vs_torch_unary": round(fast["fps"] / torch_unary["fps"], 3),
            "live_p99_minus_raw_p99_ms (<= 5)": round(
                edgescope["live_30fps"]["end_to_end"]["p99_ms"] - raw["p99_ms"], 3
            ),
            "rss_growth_mb (<= 10)": edgescope["soak"]["rss_growth_after_warmup_mb"],
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "runtime_overhead.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["targets"], indent=2))
    print(f"raw {raw}\ntorch-unary {torch_unary}\nedgescope fast {fast}\nlive {edgescope['live_30fps']}")
    print(f"live, shared memory {edgescope['live_30fps_shared_memory']}")
    if plot(report, RESULTS / "runtime_overhead.png"):
        print(f"plot: {RESULTS / 'runtime_overhead.png'}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
