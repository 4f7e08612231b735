"""Decompression and amplification bombs against a server in its own process, with its peak RSS measured.

Each bomb is a small request that would make the server allocate gigabytes
if it decoded or ran it before checking. The server must refuse it with the
documented code while its resident memory stays within a generous bound,
then go on serving. Peak RSS is the kernel's high-water mark (VmHWM), reset
before each bomb through /proc/PID/clear_refs.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgescope.bundle import Bundle
from edgescope.kserve.v2 import inference_pb2 as kserve_pb2
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.v1 import stream_pb2, stream_pb2_grpc

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")

MIB = 1024 * 1024
# Generous: the refused requests themselves are up to 63 MB, received and parsed once or twice.
MAX_GROWTH_MIB = 400


def png_bomb(width: int, height: int, *, bits: int, color_type: int, level: int) -> bytes:
    """A valid PNG of zeros: deflate shrinks it about a thousandfold."""
    channels = {0: 1, 2: 3}[color_type]
    row = bytes(1 + width * channels * bits // 8)
    compressor = zlib.compressobj(level)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bits, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    target: str

    def _status(self, field: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def reset_peak(self) -> int:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        return self._status("VmRSS")

    def peak(self) -> int:
        return self._status("VmHWM")


def start_server(bundle: Path, folder: Path, env: dict[str, str] | None = None) -> ServerProcess:
    port_file = folder / "port"
    command = [
        sys.executable,
        "-m",
        "edgescope.cli",
        "serve",
        str(bundle),
        "--port",
        "0",
        "--port-file",
        str(port_file),
    ]
    command += ["--metrics-port", "-1", "--frame-threads", "2", "--max-message-mb", "80"]
    with (folder / "server.log").open("wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, cwd=folder)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not start: {(folder / 'server.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return ServerProcess(process, f"127.0.0.1:{port_file.read_text().strip()}")


def stop_server(server: ServerProcess) -> None:
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=10)


def good_frame() -> stream_pb2.Frame:
    return stream_pb2.Frame(model="lesion-unet", raw=encode_raw(np.full((64, 64), 90, dtype=np.uint8)))


def bombs(input_name: str) -> dict[str, tuple[str, bytes]]:
    """Bomb -> (method path, serialized request)."""
    gray = png_bomb(16384, 16384, bits=8, color_type=0, level=9)
    rgb16 = png_bomb(16384, 16384, bits=16, color_type=2, level=1)
    batch = 240  # 240 x 1 x 256 x 256 FP32: a 63 MB request
    tensor = kserve_pb2.ModelInferRequest.InferInputTensor(name=input_name, datatype="FP32", shape=[batch, 1, 256, 256])
    kserve = kserve_pb2.ModelInferRequest(model_name="lesion-unet", inputs=[tensor])
    kserve.raw_input_contents.append(np.zeros((batch, 1, 256, 256), dtype=np.float32).tobytes())

    def infer(data: bytes) -> bytes:
        frame = stream_pb2.Frame(model="lesion-unet", encoded=stream_pb2.EncodedImage(encoding=1, data=data))
        return frame.SerializeToString()

    return {
        f"PNG 16384x16384 8-bit gray ({len(gray) // 1024} KB)": ("/edgescope.v1.StreamService/Infer", infer(gray)),
        f"PNG 16384x16384 16-bit RGB ({len(rgb16) // 1024} KB)": ("/edgescope.v1.StreamService/Infer", infer(rgb16)),
        f"KServe ModelInfer batch {batch} ({kserve.ByteSize() // MIB} MB)": (
            "/inference.GRPCInferenceService/ModelInfer",
            kserve.SerializeToString(),
        ),
    }


def measure(server: ServerProcess, method: str, payload: bytes) -> tuple[str, int, int]:
    """(status code name, RSS before, peak RSS while answering)."""
    options = [("grpc.max_send_message_length", 80 * MIB), ("grpc.max_receive_message_length", 80 * MIB)]
    with grpc.insecure_channel(server.target, options=options) as channel:
        stream_pb2_grpc.StreamServiceStub(channel).Infer(good_frame(), timeout=60)  # warm
        before = server.reset_peak()
        try:
            channel.unary_unary(method)(payload, timeout=120)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        peak = server.peak()
        stream_pb2_grpc.StreamServiceStub(channel).Infer(good_frame(), timeout=60)  # still serving
    return code, before, peak


@pytest.fixture(scope="module")
def server(example_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    running = start_server(example_bundle.path, tmp_path_factory.mktemp("bomb-server"), dict(os.environ))
    try:
        yield running
    finally:
        stop_server(running)


def test_bombs_are_refused_with_bounded_memory(server: ServerProcess, example_bundle: Bundle) -> None:
    figures = {}
    for name, (method, payload) in bombs(example_bundle.manifest.inputs[0].name).items():
        code, before, peak = measure(server, method, payload)
        figures[name] = (code, before // MIB, peak // MIB)
        assert code == "INVALID_ARGUMENT", (name, code)
        assert peak - before < MAX_GROWTH_MIB * MIB, f"{name}: RSS {before // MIB} -> peak {peak // MIB} MiB"
    for name, (code, before, peak) in figures.items():
        print(f"{name}: {code}, RSS {before} MiB, peak {peak} MiB (+{peak - before} MiB)")
