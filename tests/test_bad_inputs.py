"""Bad input of every kind, to every call, while another stream is being served.

Each kind asserts the documented answer: a gRPC status code for a call, an
error result for a bad frame in a stream (and the stream goes on). No answer
may be UNKNOWN, no status message may be unbounded, and a concurrent stream
of good frames must be answered throughout.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import pytest

from edgescope.bundle import MANIFEST_FILE, Bundle
from edgescope.kserve.v2 import inference_pb2 as kserve_pb2
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.server.security import SecurityConfig
from edgescope.runtime.server.shm import MAX_REGIONS_PER_CALLER
from edgescope.v1 import stream_pb2, stream_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc

from .bad_inputs import HUGE_NAME, MODEL, frame_cases, good_pixels, kserve_cases, raw
from .conftest import ServerThread

OK = stream_pb2.FRAME_STATUS_CODE_OK
ERROR = stream_pb2.FRAME_STATUS_CODE_ERROR
KSERVE = "/inference.GRPCInferenceService/"
STREAM = "/edgescope.v1.StreamService/"
GARBAGE = b"\xff\xff\xff\xff\xff"  # not a protobuf message: a field tag that never ends
MAX_DETAILS = 1100


@pytest.fixture(scope="module")
def repository(example_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    for name in ("lesion-unet", "binary-manifest", "extra-file", "model-swapped"):
        shutil.copytree(example_bundle.path, repo / name)
    (repo / "binary-manifest" / MANIFEST_FILE).write_bytes(b"\x00\xff" * 64)
    (repo / "extra-file" / "run_me.py").write_text("import os")
    (repo / "model-swapped" / "model.onnx").write_bytes(b"\x08\x07")
    (repo / "empty-dir").mkdir()
    (repo / "plain-file").write_text("not a bundle")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(example_bundle.path, outside / "b")
    (repo / "link-out").symlink_to(outside / "b", target_is_directory=True)
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ServerThread]:
    running = ServerThread([repository / "lesion-unet"], security=SecurityConfig(model_repository=repository))
    try:
        yield running
    finally:
        running.stop()


@dataclass
class Canary:
    """A stream of good frames sent every 40 ms while the corpus runs; every one must be answered OK."""

    target: str
    results: list[stream_pb2.Result] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def _frames(self) -> Iterator[stream_pb2.Frame]:
        seq = 0
        while not self.stop.is_set() and seq < 20_000:
            yield stream_pb2.Frame(stream_id="canary", seq=seq, model=MODEL, raw=encode_raw(good_pixels()))
            seq += 1
            time.sleep(0.04)

    def run(self) -> None:
        try:
            with grpc.insecure_channel(self.target) as channel:
                for result in stream_pb2_grpc.StreamServiceStub(channel).Stream(self._frames(), timeout=600):
                    self.results.append(result)
        except BaseException as exc:  # reported by the test
            self.error = exc


def _code(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as exc:
        details = exc.details() or ""
        assert len(details) < MAX_DETAILS, f"unbounded status message ({len(details)} chars)"
        assert "Traceback" not in details
        return str(exc.code().name)
    return "OK"


RpcCases = dict[str, tuple[Callable[[], object], str]]


def _rpc_cases(channel: grpc.Channel, input_name: str, segments: list[str]) -> RpcCases:
    """Call kind -> (the call, the status it must end with)."""
    stub = stream_pb2_grpc.StreamServiceStub(channel)
    telemetry = telemetry_pb2_grpc.TelemetryServiceStub(channel)

    def raw_unary(path: str, payload: bytes = GARBAGE) -> Callable[[], object]:
        return lambda: channel.unary_unary(path)(payload, timeout=20)

    def raw_stream(path: str, unary_request: bool = False) -> Callable[[], object]:
        if unary_request:
            return lambda: list(channel.unary_stream(path)(GARBAGE, timeout=20))
        return lambda: list(channel.stream_stream(path)(iter([GARBAGE]), timeout=20))

    def kserve(method: str, request: object, response: type) -> Callable[[], object]:
        call = channel.unary_unary(KSERVE + method, response_deserializer=response.FromString)  # type: ignore[attr-defined]
        return lambda: call(request.SerializeToString(), timeout=20)  # type: ignore[attr-defined]

    def register(region: str, slots: int = 1, slot_bytes: int = 4096) -> Callable[[], object]:
        request = stream_pb2.RegisterSharedMemoryRequest(region=region, slot_count=slots, slot_bytes=slot_bytes)
        return lambda: stub.RegisterSharedMemory(request, timeout=20)

    def load(bundle: str) -> Callable[[], object]:
        return lambda: stub.LoadModel(stream_pb2.LoadModelRequest(bundle=bundle, name="corpus"), timeout=60)

    infer_cases = {
        f"Infer: {name}": (lambda f=frame: stub.Infer(f, timeout=30), code)
        for name, frame, code in [
            ("no pixels", stream_pb2.Frame(model=MODEL), "INVALID_ARGUMENT"),
            ("NaN pixels", frame_cases()["float NaN pixel"][0], "INVALID_ARGUMENT"),
            ("TIFF as PNG", frame_cases()["TIFF labelled PNG"][0], "INVALID_ARGUMENT"),
            ("PNG bomb header", frame_cases()["PNG declares 16384x16384"][0], "INVALID_ARGUMENT"),
            ("unknown model", stream_pb2.Frame(model="nope", raw=encode_raw(good_pixels())), "NOT_FOUND"),
            ("1 MB model name", stream_pb2.Frame(model=HUGE_NAME, raw=encode_raw(good_pixels())), "INVALID_ARGUMENT"),
            (
                "1 MB stream id",
                stream_pb2.Frame(stream_id=HUGE_NAME, raw=encode_raw(good_pixels())),
                "INVALID_ARGUMENT",
            ),
            ("extra_models over the cap", frame_cases()["extra_models over the cap"][0], "INVALID_ARGUMENT"),
            ("shm not registered", frame_cases()["shm region not registered"][0], "INVALID_ARGUMENT"),
        ]
    }
    cases: dict[str, tuple[Callable[[], object], str]] = {
        **infer_cases,
        **{
            f"unparseable {method} request": (raw_unary(STREAM + method), "INVALID_ARGUMENT")
            for method in (
                "Infer",
                "ListModels",
                "GetModel",
                "LoadModel",
                "UnloadModel",
                "RegisterSharedMemory",
                "UnregisterSharedMemory",
            )
        },
        **{
            f"unparseable KServe {method} request": (raw_unary(KSERVE + method), "INVALID_ARGUMENT")
            for method in ("ModelInfer", "ModelMetadata", "ModelReady", "ServerReady", "ServerLive", "ServerMetadata")
        },
        "unparseable Stream frame": (raw_stream(STREAM + "Stream"), "INVALID_ARGUMENT"),
        "unparseable KServe stream request": (raw_stream(KSERVE + "ModelStreamInfer"), "INVALID_ARGUMENT"),
        "unparseable Subscribe request": (raw_stream(STREAM + "Subscribe", unary_request=True), "INVALID_ARGUMENT"),
        "unparseable Telemetry request": (
            raw_stream("/edgescope.v1.TelemetryService/Telemetry", unary_request=True),
            "INVALID_ARGUMENT",
        ),
        "unknown method": (raw_unary(STREAM + "Nope", b""), "UNIMPLEMENTED"),
        "unknown service": (raw_unary("/edgescope.v9.Nothing/Call", b""), "UNIMPLEMENTED"),
        "GetModel without a name": (
            lambda: stub.GetModel(stream_pb2.GetModelRequest(), timeout=20),
            "INVALID_ARGUMENT",
        ),
        "GetModel unknown": (lambda: stub.GetModel(stream_pb2.GetModelRequest(name="nope"), timeout=20), "NOT_FOUND"),
        "GetModel 1 MB name": (
            lambda: stub.GetModel(stream_pb2.GetModelRequest(name=HUGE_NAME), timeout=20),
            "NOT_FOUND",
        ),
        "LoadModel without a bundle": (load(""), "INVALID_ARGUMENT"),
        "LoadModel path escape": (load("../lesion-unet"), "INVALID_ARGUMENT"),
        "LoadModel absolute path": (load("/etc"), "INVALID_ARGUMENT"),
        "LoadModel '..'": (load(".."), "INVALID_ARGUMENT"),
        "LoadModel hidden name": (load(".ssh"), "INVALID_ARGUMENT"),
        "LoadModel 1 MB name": (load(HUGE_NAME), "INVALID_ARGUMENT"),
        "LoadModel NUL in name": (load("lesion\0unet"), "INVALID_ARGUMENT"),
        "LoadModel absent bundle": (load("absent"), "NOT_FOUND"),
        "LoadModel a plain file": (load("plain-file"), "NOT_FOUND"),
        "LoadModel empty directory": (load("empty-dir"), "FAILED_PRECONDITION"),
        "LoadModel binary manifest": (load("binary-manifest"), "FAILED_PRECONDITION"),
        "LoadModel unlisted file": (load("extra-file"), "FAILED_PRECONDITION"),
        "LoadModel swapped model": (load("model-swapped"), "FAILED_PRECONDITION"),
        "LoadModel link out of the repository": (load("link-out"), "FAILED_PRECONDITION"),
        "UnloadModel unknown": (
            lambda: stub.UnloadModel(stream_pb2.UnloadModelRequest(name="nope"), timeout=20),
            "NOT_FOUND",
        ),
        "UnloadModel 1 MB name": (
            lambda: stub.UnloadModel(stream_pb2.UnloadModelRequest(name=HUGE_NAME), timeout=20),
            "NOT_FOUND",
        ),
        "Register shm '..'": (register(".."), "INVALID_ARGUMENT"),
        "Register shm ''": (register(""), "INVALID_ARGUMENT"),
        "Register shm path": (register("/dev/shm/x"), "INVALID_ARGUMENT"),
        "Register shm 'a/b'": (register("a/b"), "INVALID_ARGUMENT"),
        "Register shm NUL": (register("a\0b"), "INVALID_ARGUMENT"),
        "Register shm non-ASCII": (register("régïon"), "INVALID_ARGUMENT"),
        "Register shm 1 MB name": (register(HUGE_NAME), "INVALID_ARGUMENT"),
        "Register shm absent": (register("edgescope-absent-region"), "INVALID_ARGUMENT"),
        "Register shm zero slots": (register(segments[0], slots=0), "INVALID_ARGUMENT"),
        "Register shm zero slot bytes": (register(segments[0], slot_bytes=0), "INVALID_ARGUMENT"),
        "Register shm 2^32 x 2^60 bytes": (
            register(segments[0], slots=2**32 - 1, slot_bytes=2**60),
            "INVALID_ARGUMENT",
        ),
        "Register shm larger than the segment": (register(segments[0], slots=8), "INVALID_ARGUMENT"),
        "Unregister shm '..'": (
            lambda: stub.UnregisterSharedMemory(stream_pb2.UnregisterSharedMemoryRequest(region=".."), timeout=20),
            "INVALID_ARGUMENT",
        ),
        "Unregister shm of another caller": (
            lambda: stub.UnregisterSharedMemory(
                stream_pb2.UnregisterSharedMemoryRequest(region=segments[0]), timeout=20
            ),
            "PERMISSION_DENIED",
        ),
        "Subscribe without captures": (
            lambda: list(stub.Subscribe(stream_pb2.SubscribeRequest(capture="x"), timeout=20)),
            "FAILED_PRECONDITION",
        ),
        "Telemetry negative interval": (
            lambda: list(telemetry.Telemetry(telemetry_pb2.TelemetryRequest(interval_s=-1), timeout=20)),
            "INVALID_ARGUMENT",
        ),
        "KServe ModelMetadata without a name": (
            kserve("ModelMetadata", kserve_pb2.ModelMetadataRequest(), kserve_pb2.ModelMetadataResponse),
            "INVALID_ARGUMENT",
        ),
        "KServe ModelMetadata unknown": (
            kserve("ModelMetadata", kserve_pb2.ModelMetadataRequest(name="nope"), kserve_pb2.ModelMetadataResponse),
            "NOT_FOUND",
        ),
        "KServe ModelMetadata wrong version": (
            kserve(
                "ModelMetadata",
                kserve_pb2.ModelMetadataRequest(name=MODEL, version="9"),
                kserve_pb2.ModelMetadataResponse,
            ),
            "NOT_FOUND",
        ),
    }
    for name, (request, code) in kserve_cases(input_name).items():
        cases[f"KServe ModelInfer: {name}"] = (kserve("ModelInfer", request, kserve_pb2.ModelInferResponse), code)
    return cases


def test_bad_input_corpus_gets_documented_answers_while_a_stream_is_served(
    server: ServerThread, example_bundle: Bundle
) -> None:
    segments = [shared_memory.SharedMemory(create=True, size=4096) for _ in range(MAX_REGIONS_PER_CALLER + 2)]
    canary = Canary(server.target)
    thread = threading.Thread(target=canary.run, daemon=True)
    thread.start()
    outcomes: dict[str, tuple[str, str]] = {}
    try:
        # Its own connection (channels of one process share connections by default): another caller.
        separate = [("grpc.use_local_subchannel_pool", 1)]
        with (
            grpc.insecure_channel(server.target) as channel,
            grpc.insecure_channel(server.target, options=separate) as other,
        ):
            stub = stream_pb2_grpc.StreamServiceStub(channel)
            # Another connection owns segment 0: this one may neither read nor unregister it.
            stream_pb2_grpc.StreamServiceStub(other).RegisterSharedMemory(
                stream_pb2.RegisterSharedMemoryRequest(region=segments[0].name, slot_count=1, slot_bytes=4096),
                timeout=20,
            )
            names = [s.name for s in segments]
            for name, (call, expected) in _rpc_cases(channel, example_bundle.manifest.inputs[0].name, names).items():
                outcomes[name] = (_code(call), expected)

            # The per-caller cap: this connection may hold MAX_REGIONS_PER_CALLER regions, no more.
            for segment in segments[1 : MAX_REGIONS_PER_CALLER + 1]:
                stub.RegisterSharedMemory(
                    stream_pb2.RegisterSharedMemoryRequest(region=segment.name, slot_count=1, slot_bytes=4096),
                    timeout=20,
                )
            last = stream_pb2.RegisterSharedMemoryRequest(region=segments[-1].name, slot_count=1, slot_bytes=4096)
            outcomes["Register shm past the per-caller cap"] = (
                _code(lambda: stub.RegisterSharedMemory(last, timeout=20)),
                "RESOURCE_EXHAUSTED",
            )

            # Bad frames in one stream: each gets an error result, the good ones between them succeed.
            cases = frame_cases()
            stolen = stream_pb2.SharedMemoryFrame(region=segments[0].name, slot=0, size=64 * 48, image=raw(data=b""))
            cases["shm region of another caller"] = (stream_pb2.Frame(shm=stolen), "another caller")
            frames: list[stream_pb2.Frame] = []
            for index, (frame, _) in enumerate(cases.values()):
                bad = stream_pb2.Frame()
                bad.CopyFrom(frame)
                bad.stream_id, bad.seq = "corpus", 2 * index
                bad.model = bad.model or MODEL
                frames.append(bad)
                good = stream_pb2.Frame(
                    stream_id="corpus", seq=2 * index + 1, model=MODEL, raw=encode_raw(good_pixels())
                )
                frames.append(good)
            results = list(stub.Stream(iter(frames), timeout=300))
        assert [r.seq for r in results] == list(range(len(frames)))
        for index, (name, (_, phrase)) in enumerate(cases.items()):
            bad, good = results[2 * index], results[2 * index + 1]
            ok = bad.status.code == ERROR and phrase in bad.status.reason and len(bad.status.reason) < MAX_DETAILS
            outcomes[f"Stream frame: {name}"] = (
                "ERROR" if ok else f"{stream_pb2.FrameStatusCode.Name(bad.status.code)}: {bad.status.reason[:200]}",
                "ERROR",
            )
            assert good.status.code == OK, f"the good frame after {name!r} failed: {good.status.reason}"
    finally:
        canary.stop.set()
        thread.join(timeout=60)
        for segment in segments:
            segment.close()
            segment.unlink()

    wrong = {name: got for name, (got, expected) in outcomes.items() if got != expected}
    assert not wrong, f"{len(wrong)} of {len(outcomes)} kinds got the wrong answer: {wrong}"
    assert len(outcomes) >= 100, f"only {len(outcomes)} kinds"
    assert not any(got == "UNKNOWN" for got, _ in outcomes.values())
    # The concurrent stream was served the whole time.
    assert canary.error is None, canary.error
    assert len(canary.results) >= 10
    assert [r.seq for r in canary.results] == list(range(len(canary.results)))
    assert all(r.status.code == OK for r in canary.results)
    print(f"bad-input corpus: {len(outcomes)} kinds, all answered as documented")
