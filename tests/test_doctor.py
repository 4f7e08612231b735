"""`edgescope doctor`: each probe on given facts, and the whole report on this machine."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgescope.bundle import Bundle
from edgescope.engines import DeviceFacts, write_sidecar
from edgescope.runtime import doctor
from edgescope.v1 import manifest_pb2

V1 = {"cmov", "cx8", "fpu", "fxsr", "mmx", "sse", "sse2"}
V2 = V1 | {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}
V3 = V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
V4 = V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@pytest.mark.parametrize(
    ("flags", "level"),
    [
        (set(), None),
        (V1, "x86-64-v1"),
        (V2, "x86-64-v2"),
        (V3, "x86-64-v3"),
        (V4, "x86-64-v4"),
        (V3 - {"movbe"}, "x86-64-v2"),
        # A level counts only when every lower one is complete.
        (V4 - {"popcnt"}, "x86-64-v1"),
    ],
)
def test_x86_level_from_cpu_flags(flags: set[str], level: str | None) -> None:
    assert doctor.x86_level(flags) == level


def _cpuinfo(**fields: str) -> str:
    first = "\n".join(f"{key.replace('_', ' ')}\t: {value}" for key, value in fields.items())
    return f"processor\t: 0\n{first}\n\nprocessor\t: 1\nflags\t: fpu\n"


def test_cpu_check_reads_the_first_processor_and_finds_vnni() -> None:
    flags = " ".join(sorted(V4 | {"avx512_vnni", "amx_int8"}))
    check = doctor.cpu_check(_cpuinfo(model_name="Xeon Test", flags=flags), machine="x86_64")
    assert check.status == doctor.OK
    assert check.details["isa_level"] == "x86-64-v4" and check.details["avx512_vnni"] is True
    assert "AVX-512 VNNI" in check.summary and "AMX INT8" in check.details["features"]
    plain = doctor.cpu_check(_cpuinfo(model_name="Old", flags=" ".join(sorted(V2))), machine="x86_64")
    assert plain.details["isa_level"] == "x86-64-v2" and "no VNNI" in plain.summary


def test_cpu_check_on_arm_lists_its_features_and_elsewhere_warns() -> None:
    check = doctor.cpu_check(_cpuinfo(Features="fp asimd asimdhp asimddp i8mm"), machine="aarch64")
    assert check.status == doctor.OK
    assert check.details["features"] == ["NEON", "FP16 SIMD", "int8 dot product", "int8 matrix multiply"]
    assert doctor.cpu_check("", machine="aarch64").status == doctor.WARNING
    assert doctor.cpu_check("", machine="x86_64").status == doctor.WARNING
    assert doctor.cpu_check("", machine="riscv64").status == doctor.WARNING


class FakeNvml:
    """pynvml's calls that the doctor makes, answering for one GPU (or failing where told)."""

    class NVMLError(Exception):
        pass

    def __init__(self, fail_at: str = "") -> None:
        self.fail_at = fail_at
        self.shut_down = False

    def _maybe_fail(self, call: str) -> None:
        if call == self.fail_at:
            raise self.NVMLError(f"{call} failed")

    def nvmlInit(self) -> None:
        self._maybe_fail("nvmlInit")

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlSystemGetDriverVersion(self) -> str:
        return "570.1"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12080

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        self._maybe_fail("nvmlDeviceGetCudaComputeCapability")
        return 9, 0

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return type("Memory", (), {"total": 141 * 1024**3})()


def test_nvml_probe_describes_each_gpu_and_fails_cleanly() -> None:
    fake = FakeNvml()
    check = doctor.nvml_gpus(fake)
    assert check.status == doctor.OK and fake.shut_down
    assert check.details["cuda_driver"] == "12.8" and check.details["driver"] == "570.1"
    assert check.details["gpus"] == [
        {"index": 0, "name": "NVIDIA H200", "compute_capability": "9.0", "memory_bytes": 141 * 1024**3}
    ]
    assert doctor.telemetry_check(check).details == {"source": "nvml"}
    absent = doctor.nvml_gpus(FakeNvml(fail_at="nvmlInit"))
    assert absent.status == doctor.MISSING and "nvmlInit failed" in absent.summary
    assert doctor.telemetry_check(absent).status == doctor.MISSING
    broken = FakeNvml(fail_at="nvmlDeviceGetCudaComputeCapability")
    assert doctor.nvml_gpus(broken).status == doctor.ERROR and broken.shut_down


def _bundle_with_engines(example_bundle: Bundle, tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(example_bundle.path, bundle)
    (bundle / "engines").mkdir(exist_ok=True)
    for plan, gpu, cc in (("h200.plan", "NVIDIA H200", "9.0"), ("orin.plan", "Orin", "8.7")):
        entry = manifest_pb2.EngineEntry(
            plan=f"engines/{plan}",
            gpu_name=gpu,
            compute_capability=cc,
            sm_count=132,
            tensorrt_version="10.16.1",
            precision=manifest_pb2.PRECISION_FP16,
            dla_core=-1,
            hardware_compatibility="none",
        )
        write_sidecar(bundle / "engines" / plan.replace(".plan", ".json"), entry)
    return bundle


def test_engines_check_says_which_engine_fits_this_device(
    example_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = _bundle_with_engines(example_bundle, tmp_path)
    here = DeviceFacts("NVIDIA H200", (9, 0), 132, "10.16.1")
    monkeypatch.setattr(doctor, "device_facts", lambda: here)
    check = doctor.engines_check(bundle)
    assert check.status == doctor.OK
    assert check.details["matching"] == ["engines/h200.plan (fp16)"]
    assert "compute capability 8.7" in check.details["not_matching"]["engines/orin.plan (fp16)"]
    other = DeviceFacts("NVIDIA H200", (9, 0), 132, "10.9.0")
    monkeypatch.setattr(doctor, "device_facts", lambda: other)
    assert doctor.engines_check(bundle).status == doctor.WARNING
    assert "edgescope engines" in doctor.engines_check(bundle).summary
    assert doctor.engines_check(example_bundle.path).status == doctor.OK  # no engines, but model.onnx


def test_engines_check_without_tensorrt_still_lists_the_engines(example_bundle: Bundle, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    if doctor.tensorrt_check().status == doctor.OK:
        pytest.skip("TensorRT is installed here")
    check = doctor.engines_check(_bundle_with_engines(example_bundle, tmp_path))
    assert check.status == doctor.WARNING and "TensorRT" in check.summary
    assert sorted(check.details["engines"]) == ["engines/h200.plan", "engines/orin.plan"]


def test_ports_in_use_and_free() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert doctor.port_check("127.0.0.1", port, "gRPC").status == doctor.WARNING
    assert doctor.port_check("127.0.0.1", port, "gRPC").status == doctor.OK


def test_a_failing_probe_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> doctor.Check:
        raise RuntimeError("sensor on fire")

    monkeypatch.setattr(doctor, "tensorrt_check", broken)
    checks = {check.name: check for check in doctor.run_checks()}
    assert checks["tensorrt"].status == doctor.ERROR and "sensor on fire" in checks["tensorrt"].summary
    # What depends on it still answers.
    assert "tensorrt" in checks["backends"].details["missing"]


def test_the_report_on_this_machine_in_words_and_json(example_bundle: Bundle) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "edgescope.cli", "doctor", str(example_bundle.path), "--json", "--port", "0",
         "--metrics-port", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    checks = {check["name"]: check for check in report["checks"]}
    expected = {"platform", "cpu", "memory", "gpu", "gpu telemetry", "cuda runtime", "tensorrt", "onnxruntime"}
    bundle_checks = {f"engines {example_bundle.path}", f"threads {example_bundle.path}"}
    assert expected | {"backends", "export", "port 0"} | bundle_checks == set(checks)
    assert all(check["status"] in ("ok", "missing", "warning", "error") for check in checks.values())
    assert "CPUExecutionProvider" in checks["onnxruntime"]["details"]["providers"]
    assert "onnxruntime" in checks["backends"]["details"]["usable"]
    words = subprocess.run(
        [sys.executable, "-m", "edgescope.cli", "doctor", "--port", "0", "--metrics-port", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert words.returncode == 0 and words.stdout.startswith("edgescope doctor: what this device can run")
    assert "backends" in words.stdout and "can run: onnxruntime" in words.stdout
