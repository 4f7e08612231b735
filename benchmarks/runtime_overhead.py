"""Runtime overhead, throughput, live latency and memory, against baselines, in one run.

Same frames (the 120-frame echo cine from pydicom-data, decoded once and
looped) throughout, on two workloads:

1. the example lesion U-Net (121k parameters, 256x256 gray input) on the
   cine's 480x640 RGB frames:

   - raw: the ONNX Runtime session in a tight loop on preprocessed tensors
     (the limit no server can beat);
   - torch-unary: a plain gRPC unary server that runs the PyTorch model per
     request (what a team would otherwise write);
   - plain-ort: a plain grpcio unary server around the same ONNX Runtime
     session (decode, preprocess, infer, mask PNG; the afternoon's work);
   - edgescope: ``edgescope serve`` streamed as fast as possible (every), at
     the cine's 30 fps (live), and for a long run sampling the server's RSS;

2. a MONAI U-Net of 1.6M parameters on the cine as gray 480x640 frames,
   where inference dominates: raw, plain-ort and edgescope (as shipped, and
   with ``--intra-op-spinning``), each one frame at a time (send, wait for
   the answer, send the next).

This VM's speed drifts by 10-20 % over minutes, so the modes compared for
throughput run in alternating rounds (raw, baselines, edgescope, repeated)
and each mode's figures pool its rounds: drift lands on all of them alike.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
from common import EXAMPLE, RESULTS, ROOT, Timed, export_example, percentiles
from replay import ReplaySource

from edgescope.bundle import load_bundle
from edgescope.export import ExportRequest, export_model
from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgescope.runtime.client.demo import start_server, stop_server
from edgescope.runtime.client.stream import StreamOptions, stream_source
from edgescope.runtime.pipeline.preprocess import preprocess
from edgescope.runtime.sources import SourceFrame, open_source
from edgescope.v1 import stream_pb2


def rotated(items: list[Any], offset: int) -> list[Any]:
    """The same frames starting at ``offset``, so successive rounds cover the whole clip."""
    offset %= len(items)
    return items[offset:] + items[:offset]


class RawLoop:
    """The bundle's ONNX Runtime session in a tight loop on preprocessed tensors."""

    def __init__(self, bundle_path: Path, frames: list[SourceFrame]) -> None:
        bundle = load_bundle(bundle_path)
        self._session = OnnxRuntimeBackend().load(bundle)
        self._tensors = [preprocess(f.pixels, bundle.manifest.preprocessing)[0] for f in frames]
        self._name = bundle.manifest.inputs[0].name
        self._session.infer({self._name: self._tensors[0]})
        self.timed = Timed()

    def run(self, count: int, offset: int) -> None:
        start = time.perf_counter()
        for index in range(offset, offset + count):
            begin = time.perf_counter()
            self._session.infer({self._name: self._tensors[index % len(self._tensors)]})
            self.timed.times.append((time.perf_counter() - begin) * 1e3)
        self.timed.elapsed += time.perf_counter() - start

    def close(self) -> None:
        self._session.close()


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


_PLAIN_ORT_SERVER = r"""
import sys, grpc, numpy as np, onnxruntime as ort, cv2
from concurrent import futures
options = ort.SessionOptions()
options.intra_op_num_threads = 2
session = ort.InferenceSession(sys.argv[1], sess_options=options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
height, width = int(sys.argv[2]), int(sys.argv[3])
def infer(request, context):
    h, w, c = (int.from_bytes(request[i:i + 4], "little") for i in (0, 4, 8))
    pixels = np.frombuffer(request[12:], np.uint8).reshape((h, w, c) if c > 1 else (h, w))
    gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY) if c > 1 else pixels
    if gray.shape != (height, width):
        gray = cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA)
    (logits,) = session.run(None, {name: gray[None, None].astype(np.float32) / 255.0})
    mask = (logits[0, 0] > 0).astype(np.uint8)
    if mask.shape != (h, w):
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return cv2.imencode(".png", mask)[1].tobytes()
server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 64 << 20)])
handler = grpc.method_handlers_generic_handler("plain.Seg", {"Infer": grpc.unary_unary_rpc_method_handler(infer)})
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"""


def _payload(pixels: np.ndarray[Any, Any]) -> bytes:
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    header = b"".join(v.to_bytes(4, "little") for v in (pixels.shape[0], pixels.shape[1], channels))
    return header + np.ascontiguousarray(pixels).tobytes()


class UnaryServer:
    """A plain unary gRPC server script in its own process; requests sent one at a time and timed."""

    def __init__(self, script: str, args: list[str], payloads: list[bytes], workdir: Path) -> None:
        path = workdir / f"server_{len(list(workdir.iterdir()))}.py"
        path.write_text(script)
        self._process = subprocess.Popen([sys.executable, str(path), *args], stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        port = int(self._process.stdout.readline())
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
        self._call = self._channel.unary_unary("/plain.Seg/Infer")
        self._payloads = payloads
        self._call(payloads[0], timeout=60)
        self.timed = Timed()

    def run(self, count: int, offset: int) -> None:
        start = time.perf_counter()
        for index in range(offset, offset + count):
            begin = time.perf_counter()
            self._call(self._payloads[index % len(self._payloads)], timeout=60)
            self.timed.times.append((time.perf_counter() - begin) * 1e3)
        self.timed.elapsed += time.perf_counter() - start

    def close(self) -> None:
        self._channel.close()
        if self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=30)


def plain_ort_server(bundle_path: Path, frames: list[SourceFrame], workdir: Path) -> UnaryServer:
    spec = load_bundle(bundle_path).manifest.preprocessing
    args = [str(bundle_path / "model.onnx"), str(spec.height), str(spec.width)]
    return UnaryServer(_PLAIN_ORT_SERVER, args, [_payload(f.pixels) for f in frames], workdir)


def torch_unary_server(frames: list[SourceFrame], workdir: Path) -> UnaryServer:
    payloads = []
    for frame in frames:
        rgb = frame.pixels if frame.pixels.ndim == 3 else np.stack([frame.pixels] * 3, axis=-1)
        h, w = rgb.shape[:2]
        payloads.append(h.to_bytes(4, "little") + w.to_bytes(4, "little") + rgb.tobytes())
    return UnaryServer(_TORCH_SERVER, ["", str(EXAMPLE), str(EXAMPLE / "weights.pt")], payloads, workdir)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


@dataclass
class Streamed:
    """Streams of one mode: latency of the answered frames and throughput, pooled over rounds."""

    e2e: list[float] = field(default_factory=list)
    infer: list[float] = field(default_factory=list)
    sent: int = 0
    elapsed: float = 0.0
    dropped: int = 0
    errors: int = 0

    def stream(self, source: ReplaySource, options: StreamOptions) -> None:
        def per_frame(_frame: SourceFrame, result: stream_pb2.Result) -> None:
            if result.status.code == stream_pb2.FRAME_STATUS_CODE_OK:
                self.e2e.append((time.time_ns() - result.capture_time_ns) / 1e6)
                self.infer.append(next(t.duration_ns for t in result.timings if t.stage == "infer") / 1e6)

        start = time.perf_counter()
        report = asyncio.run(stream_source(source, options, per_frame))
        self.elapsed += time.perf_counter() - start
        self.sent += report.sent
        self.dropped += report.latency.dropped
        self.errors += report.latency.errors

    def summary(self) -> dict[str, Any]:
        return {
            "frames": self.sent,
            "fps": round(self.sent / self.elapsed, 2),
            "end_to_end": percentiles(self.e2e),
            "infer": percentiles(self.infer),
            "overhead": percentiles([total - model for total, model in zip(self.e2e, self.infer, strict=True)]),
            "dropped": self.dropped,
            "errors": self.errors,
        }


def bench_lesion(
    bundle_path: Path, frames: list[SourceFrame], fps: float, counts: dict[str, int], rounds: int, workdir: Path
) -> dict[str, Any]:
    """Throughput against the baselines in alternating rounds, then live latency and the RSS soak."""
    pixels = [f.pixels for f in frames]

    def replay(count: int, offset: int = 0) -> ReplaySource:
        return ReplaySource(rotated(pixels, offset), fps, count, "ultrasound", frames[0].spacing_mm)

    raw = RawLoop(bundle_path, frames)
    torch_unary = torch_unary_server(frames, workdir)
    plain = plain_ort_server(bundle_path, frames, workdir)
    server = None
    results: dict[str, Any] = {}
    try:
        server, target = start_server([bundle_path], workdir / "port")
        # A window of 3 frames keeps every stage busy without queueing frames in transport buffers.
        options = StreamOptions(target=target, model="", realtime=False, max_in_flight=3)
        fast = Streamed()
        for index in range(rounds):
            raw.run(counts["raw"] // rounds, index * 37)
            torch_unary.run(counts["unary"] // rounds, index * 37)
            plain.run(counts["unary"] // rounds, index * 37)
            fast.stream(replay(counts["fast"] // rounds, index * 37), options)
        results["raw"], results["fast"] = raw.timed.summary(), fast.summary()
        results["torch_unary"], results["plain_ort"] = torch_unary.timed.summary(), plain.timed.summary()
        torch_unary.close()
        plain.close()

        live = StreamOptions(target=target, model="", realtime=True, policy=stream_pb2.STREAM_POLICY_LIVE)
        live_run = Streamed()
        live_run.stream(replay(counts["live"]), live)
        results["live_30fps"] = live_run.summary()
        # The same live stream with frames handed over in shared memory instead of protobuf bytes.
        live.shared_memory = True
        shm_run = Streamed()
        shm_run.stream(replay(counts["live"]), live)
        results["live_30fps_shared_memory"] = shm_run.summary()

        soak = counts["soak"]
        rss: list[tuple[int, float]] = [(0, _rss_mb(server.pid))]
        step = max(1, soak // 20)

        def sample_rss(source_frame: SourceFrame, result: stream_pb2.Result) -> None:
            if (source_frame.index + 1) % step == 0:
                rss.append((source_frame.index + 1, _rss_mb(server.pid)))

        asyncio.run(stream_source(replay(soak), options, sample_rss))
        # The first samples include allocator warm-up; flatness is judged after it.
        settled = [mb for index, mb in rss if index >= soak // 10]
        results["soak"] = {
            "frames": soak,
            "rss_mb": [(index, round(mb, 1)) for index, mb in rss],
            "rss_growth_after_warmup_mb": round(max(settled) - min(settled), 2) if settled else None,
        }
    finally:
        if server is not None:
            stop_server(server)
        raw.close()
        # Closing twice is harmless: the processes may already have been ended above.
        for baseline in (torch_unary, plain):
            baseline.close()
    return results


def bench_heavy(frames: list[SourceFrame], fps: float, count: int, rounds: int, workdir: Path) -> dict[str, Any]:
    """The 1.6M-parameter U-Net on gray 480x640 frames, one frame at a time: raw, plain-ort, edgescope."""
    gray = [cv2.cvtColor(f.pixels, cv2.COLOR_RGB2GRAY) if f.pixels.ndim == 3 else f.pixels for f in frames]
    gray_frames = [SourceFrame(f.index, g, f.timestamp_s, f.spacing_mm) for f, g in zip(frames, gray, strict=True)]
    bundle = workdir / "unet-1m6"
    export_model(
        ExportRequest(
            name="unet-1m6",
            output=bundle,
            factory=f"{ROOT / 'benchmarks' / 'models.py'}:build_unet_1m6",
            input_height=480,
            input_width=640,
            samples=2,
            # Its logits reach tens (the added term): the default relative tolerance covers their rounding.
        ),
        log=lambda _line: None,
    )
    raw = RawLoop(bundle, gray_frames)
    plain = plain_ort_server(bundle, gray_frames, workdir)
    servers: list[Any] = []
    # edgescope as shipped, and with ONNX Runtime's busy-wait back on (as the plain server has it).
    runs = {"edgescope_send_answer": Streamed(), "edgescope_spinning_send_answer": Streamed()}
    try:
        targets = []
        for name, extra in zip(runs, ([], ["--intra-op-spinning", "on"]), strict=True):
            server, target = start_server([bundle], workdir / f"{name}-port", extra)
            servers.append(server)
            targets.append(target)
        per_round = count // rounds
        for index in range(rounds):
            raw.run(per_round, index * per_round)
            plain.run(per_round, index * per_round)
            for run, target in zip(runs.values(), targets, strict=True):
                options = StreamOptions(target=target, model="", realtime=False, max_in_flight=1)
                run.stream(ReplaySource(rotated(gray, index * per_round), fps, per_round, "ultrasound"), options)
    finally:
        for server in servers:
            stop_server(server)
        raw.close()
        plain.close()
    raw_fps, plain_fps = raw.timed.summary()["fps"], plain.timed.summary()["fps"]
    report: dict[str, Any] = {
        "model": "MONAI UNet (16, 32, 64, 128, 256), 2 residual units, 1.62M parameters, 480x640 gray input",
        "raw": raw.timed.summary(),
        "plain_ort": plain.timed.summary(),
    }
    for name, run in runs.items():
        report[name] = run.summary()
    shipped, spinning = report["edgescope_send_answer"]["fps"], report["edgescope_spinning_send_answer"]["fps"]
    report["edgescope_vs_raw"] = round(shipped / raw_fps, 3)
    report["edgescope_vs_plain_ort"] = round(shipped / plain_fps, 3)
    report["edgescope_spinning_vs_plain_ort"] = round(spinning / plain_fps, 3)
    return report


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
    if args.quick:
        counts, rounds = {"raw": 200, "unary": 100, "fast": 200, "live": 150, "soak": 2000, "heavy": 30}, 2
    else:
        counts, rounds = {"raw": 1000, "unary": 300, "fast": 1000, "live": 300, "soak": 20000, "heavy": 120}, 5

    from pydicom.data import get_testdata_file

    cine = get_testdata_file("color3d_jpeg_baseline.dcm")
    with open_source(f"dicom:{cine}") as source:
        frames, fps = list(source), source.fps
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        bundle = export_example(workdir).path
        heavy = bench_heavy(frames, fps, counts["heavy"], 4 if rounds > 2 else rounds, workdir)
        edgescope = bench_lesion(bundle, frames, fps, counts, rounds, workdir)
    raw, torch_unary, plain_ort = edgescope.pop("raw"), edgescope.pop("torch_unary"), edgescope.pop("plain_ort")

    fast = edgescope["fast"]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, CPU only",
        "frames": "color3d_jpeg_baseline.dcm, 480x640 RGB, model input 256x256 gray",
        "raw": raw,
        "torch_unary": torch_unary,
        "plain_ort": plain_ort,
        "edgescope": edgescope,
        "heavy": heavy,
        "targets": {
            # Overhead is judged at the live rate, where no frame waits for another.
            "overhead_p50_ms (< 1.5)": edgescope["live_30fps"]["overhead"]["p50_ms"],
            "overhead_p50_ms_shared_memory (< 1.5)": edgescope["live_30fps_shared_memory"]["overhead"]["p50_ms"],
            "throughput_vs_raw (>= 0.9)": round(fast["fps"] / raw["fps"], 3),
            "throughput_vs_torch_unary": round(fast["fps"] / torch_unary["fps"], 3),
            "throughput_vs_plain_ort": round(fast["fps"] / plain_ort["fps"], 3),
            "heavy_send_answer_vs_raw": heavy["edgescope_vs_raw"],
            "heavy_send_answer_vs_plain_ort": heavy["edgescope_vs_plain_ort"],
            "heavy_send_answer_spinning_vs_plain_ort": heavy["edgescope_spinning_vs_plain_ort"],
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
    print(f"raw {raw}\ntorch-unary {torch_unary}\nplain-ort {plain_ort}")
    print(f"edgescope fast {fast}\nlive {edgescope['live_30fps']}")
    print(f"heavy {json.dumps(heavy)}")
    print(f"live, shared memory {edgescope['live_30fps_shared_memory']}")
    if plot(report, RESULTS / "runtime_overhead.png"):
        print(f"plot: {RESULTS / 'runtime_overhead.png'}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
