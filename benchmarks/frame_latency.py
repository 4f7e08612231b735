"""One frame's latency through edgescope against the raw model and a plain gRPC server, in one run.

The workload is one the runtime was not tuned on: a MONAI U-Net of 1.62M
parameters at a 256x256 gray input (made in code, ``models.py``), fed the
real 120-frame echo cine from pydicom-data as gray 480x640 raw frames; the
answer is the mask as a PNG, decoded by the client. Latency is what a
device sees: from the send to the decoded answer, measured by a small probe
client written against the generated stubs (not edgescope's own client).

Modes, in alternating rounds so the VM's speed drift lands on all alike:

- raw: the exported ONNX graph in a tight ONNX Runtime loop on preprocessed
  tensors, 2 threads, ONNX Runtime's defaults (the floor no server can beat);
- plain: a plain grpcio unary server around the same ONNX Runtime session
  (decode, resize, normalise, infer, threshold, mask PNG), 1 in flight;
- edgescope ``Stream``, 1 frame in flight; 4 in flight; paced at 30 fps;
- with ``--before PYTHON``: the same three modes on the edgescope installed
  for that interpreter (an earlier version), served beside this one.

Prints a table and writes ``benchmarks/results/frame_latency.json``.
Run: ``.venv/bin/python benchmarks/frame_latency.py [--quick] [--before PYTHON] [--serve-arg=--flag ...]``.
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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import onnxruntime as ort
from common import RESULTS, ROOT, Timed

from edgescope.bundle import load_bundle
from edgescope.export import ExportRequest, export_model
from edgescope.runtime.client.demo import start_server, stop_server
from edgescope.runtime.pipeline.decode import encode_raw_into
from edgescope.runtime.pipeline.preprocess import preprocess
from edgescope.runtime.sources import open_source
from edgescope.runtime.transport import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from edgescope.v1 import stream_pb2, stream_pb2_grpc

PACED_FPS = 30.0


def echo_cine_gray() -> list[np.ndarray[Any, Any]]:
    from pydicom.data import get_testdata_file

    with open_source(f"dicom:{get_testdata_file('color3d_jpeg_baseline.dcm')}") as source:
        frames = [f.pixels for f in source]
    return [np.ascontiguousarray(cv2.cvtColor(p, cv2.COLOR_RGB2GRAY)) if p.ndim == 3 else p for p in frames]


def export_unet(bundle: Path) -> None:
    export_model(
        ExportRequest(
            name="unet-1m6",
            output=bundle,
            factory=f"{ROOT / 'benchmarks' / 'models.py'}:build_unet_1m6",
            input_height=256,
            input_width=256,
            samples=4,
            # Its logits reach tens (the added term): the default relative tolerance covers their rounding.
        ),
        log=lambda _line: None,
    )


class RawLoop:
    """The exported graph in a tight loop: ONNX Runtime's defaults, 2 threads, preprocessed tensors."""

    def __init__(self, bundle: Path, frames: list[np.ndarray[Any, Any]]) -> None:
        manifest = load_bundle(bundle).manifest
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self._session = ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self._name = manifest.inputs[0].name
        self._tensors = [preprocess(f, manifest.preprocessing)[0] for f in frames]
        self._session.run(None, {self._name: self._tensors[0]})
        self.timed = Timed()

    def run(self, count: int, offset: int) -> None:
        start = time.perf_counter()
        for index in range(offset, offset + count):
            begin = time.perf_counter()
            self._session.run(None, {self._name: self._tensors[index % len(self._tensors)]})
            self.timed.times.append((time.perf_counter() - begin) * 1e3)
        self.timed.elapsed += time.perf_counter() - start
        self.timed.frames += count


_PLAIN_SERVER = r"""
import sys, grpc, numpy as np, onnxruntime as ort, cv2
from concurrent import futures
options = ort.SessionOptions()
options.intra_op_num_threads = 2
session = ort.InferenceSession(sys.argv[1], sess_options=options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
def infer(request, context):
    h, w = int.from_bytes(request[:4], "little"), int.from_bytes(request[4:8], "little")
    gray = np.frombuffer(request[8:], np.uint8).reshape(h, w)
    small = cv2.resize(gray, (256, 256), interpolation=cv2.INTER_AREA)
    (logits,) = session.run(None, {name: small[None, None].astype(np.float32) / 255.0})
    mask = cv2.resize((logits[0, 0] > 0).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    return cv2.imencode(".png", mask)[1].tobytes()
server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 64 << 20)])
handler = grpc.method_handlers_generic_handler("plain.Seg", {"Infer": grpc.unary_unary_rpc_method_handler(infer)})
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"""


def decode_png(data: bytes) -> np.ndarray[Any, Any]:
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise RuntimeError("the answer's mask is not a PNG")
    return mask


class PlainServer:
    """The plain server in its own process; one request at a time, the mask decoded."""

    def __init__(self, bundle: Path, frames: list[np.ndarray[Any, Any]], workdir: Path) -> None:
        script = workdir / "plain_server.py"
        script.write_text(_PLAIN_SERVER)
        self._process = subprocess.Popen(
            [sys.executable, str(script), str(bundle / "model.onnx")], stdout=subprocess.PIPE, text=True
        )
        assert self._process.stdout is not None
        port = int(self._process.stdout.readline())
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
        self._call = self._channel.unary_unary("/plain.Seg/Infer")
        self._payloads = [
            f.shape[0].to_bytes(4, "little") + f.shape[1].to_bytes(4, "little") + f.tobytes() for f in frames
        ]
        for payload in self._payloads[:5]:
            self._call(payload, timeout=60)
        self.timed = Timed()

    def run(self, count: int, offset: int) -> None:
        start = time.perf_counter()
        for index in range(offset, offset + count):
            begin = time.perf_counter()
            decode_png(self._call(self._payloads[index % len(self._payloads)], timeout=60))
            self.timed.times.append((time.perf_counter() - begin) * 1e3)
        self.timed.elapsed += time.perf_counter() - start
        self.timed.frames += count

    def close(self) -> None:
        self._channel.close()
        if self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=30)


class StreamProbe:
    """edgescope's Stream call driven by the generated stub: N in flight, or paced, every answer decoded."""

    def __init__(self, target: str, frames: list[np.ndarray[Any, Any]]) -> None:
        self._target = target
        self._frames = frames
        self.modes: dict[str, Timed] = {}

    def _frame(self, index: int, seq: int) -> stream_pb2.Frame:
        frame = stream_pb2.Frame(stream_id="probe", seq=seq, source_kind=stream_pb2.SOURCE_KIND_ULTRASOUND)
        encode_raw_into(frame.raw, self._frames[index % len(self._frames)])
        frame.capture_time_ns = time.time_ns()
        return frame

    async def _run(self, count: int, offset: int, in_flight: int, fps: float | None) -> Timed:
        sent_at: dict[int, float] = {}
        window = asyncio.Semaphore(in_flight)
        timed = Timed()

        async def frames() -> AsyncIterator[stream_pb2.Frame]:
            start = time.perf_counter()
            for seq in range(count):
                if fps is not None:
                    delay = start + seq / fps - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                else:
                    await window.acquire()
                frame = self._frame(offset + seq, seq)
                sent_at[seq] = time.perf_counter()
                yield frame

        options = channel_options(DEFAULT_MAX_MESSAGE_BYTES)
        async with grpc.aio.insecure_channel(self._target, options=options) as channel:
            stub = stream_pb2_grpc.StreamServiceStub(channel)
            start = time.perf_counter()
            async for result in stub.Stream(frames()):
                if result.status.code != stream_pb2.FRAME_STATUS_CODE_OK:
                    raise RuntimeError(f"frame {result.seq}: {result.status.reason}")
                decode_png(result.outputs[0].mask.png)
                timed.times.append((time.perf_counter() - sent_at.pop(result.seq)) * 1e3)
                for timing in result.timings:
                    timed.stages.setdefault(timing.stage, []).append(timing.duration_ns / 1e6)
                window.release()
            timed.elapsed = time.perf_counter() - start
            timed.frames = count
        return timed

    def run(self, mode: str, count: int, offset: int, in_flight: int = 1, fps: float | None = None) -> None:
        result = asyncio.run(self._run(count, offset, in_flight, fps))
        pooled = self.modes.setdefault(mode, Timed())
        pooled.times += result.times
        pooled.elapsed += result.elapsed
        pooled.frames += result.frames
        for name, values in result.stages.items():
            pooled.stages.setdefault(name, []).extend(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--serve-arg", action="append", default=[], help="an extra `edgescope serve` argument")
    parser.add_argument("--label", default="", help="saved as results/frame_latency[-LABEL].json")
    parser.add_argument("--before", help="a Python whose edgescope (an earlier version) is measured beside this one")
    args = parser.parse_args()
    rounds, per_round = (2, 60) if args.quick else (4, 180)

    frames = echo_cine_gray()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        bundle = workdir / "unet-1m6"
        export_unet(bundle)
        raw = RawLoop(bundle, frames)
        plain = PlainServer(bundle, frames, workdir)
        servers = {"edgescope": start_server([bundle], workdir / "port", args.serve_arg)}
        if args.before:
            # -P: the earlier version's own files, not the ones in this checkout's working directory.
            wrapper = workdir / "before-python"
            wrapper.write_text(f'#!/bin/sh\nexec "{args.before}" -P "$@"\n')
            wrapper.chmod(0o755)
            servers["before"] = start_server([bundle], workdir / "before-port", args.serve_arg, python=str(wrapper))
        probes = {name: StreamProbe(target, frames) for name, (_, target) in servers.items()}
        try:
            for probe in probes.values():
                probe.run("warm-up", 30, 0)
            for index in range(rounds):
                offset = index * 37
                raw.run(per_round, offset)
                plain.run(per_round, offset)
                for probe in probes.values():
                    probe.run("1_in_flight", per_round, offset, in_flight=1)
                    probe.run("4_in_flight", per_round, offset, in_flight=4)
                    probe.run("paced_30fps", per_round, offset, fps=PACED_FPS)
        finally:
            for server, _ in servers.values():
                stop_server(server)
            plain.close()
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}, "
        f"Python {platform.python_version()}, onnxruntime {ort.__version__}, CPU only",
        "workload": "MONAI UNet 1.62M parameters, 256x256 gray input; echo cine as gray 480x640 raw frames; PNG mask",
        "serve_args": args.serve_arg,
        "raw": raw.timed.summary(),
        "plain_1_in_flight": plain.timed.summary(),
    }
    for name, probe in probes.items():
        for mode, timed in probe.modes.items():
            if mode != "warm-up":
                report[f"{name}_{mode}"] = timed.summary()
    raw_p50, raw_p99, raw_fps = report["raw"]["p50_ms"], report["raw"]["p99_ms"], report["raw"]["fps"]
    one, paced, four = (report[f"edgescope_{m}"] for m in ("1_in_flight", "paced_30fps", "4_in_flight"))
    report["targets"] = {
        "1 in flight: p50 - raw p50 (<= 3 ms)": round(one["p50_ms"] - raw_p50, 2),
        "1 in flight: p50 - plain p50 (< 0 ms)": round(one["p50_ms"] - report["plain_1_in_flight"]["p50_ms"], 2),
        "paced 30 fps: p50 - raw p50 (<= 3 ms)": round(paced["p50_ms"] - raw_p50, 2),
        "paced 30 fps: p99 - raw p99 (<= 10 ms)": round(paced["p99_ms"] - raw_p99, 2),
        "4 in flight: fps / raw fps (>= 0.95)": round(four["fps"] / raw_fps, 3),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / (f"frame_latency-{args.label}.json" if args.label else "frame_latency.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'mode':28} {'p50 ms':>8} {'p99 ms':>8} {'fps':>7}")
    for mode in (m for m in report if isinstance(report[m], dict) and "fps" in report[m]):
        row = report[mode]
        print(f"{mode:28} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['fps']:7.2f}")
    for name in probes:
        row = report[f"{name}_1_in_flight"]
        print(f"{name}, 1 in flight, server stages (p50 ms): {row['stages_p50_ms']}")
        print(f"{name}, 1 in flight, outside the stages (p50 ms): {row['outside_stages_p50_ms']}")
    print(json.dumps(report["targets"], indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
