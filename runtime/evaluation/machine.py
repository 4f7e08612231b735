"""The machine an evaluation ran on: CPU, instruction-set level, GPU and TensorRT.

Numbers from the same graph differ between machines: ONNX Runtime's INT8
kernels on x86 saturate without VNNI, float kernels differ in their last bits
between AVX2 and AVX-512, TensorRT picks tactics per GPU. Every report names
the machine so a figure can be traced to what computed it. Read from
``/proc/cpuinfo`` on Linux; elsewhere the CPU fields say what is known.
"""

from __future__ import annotations

import platform
from pathlib import Path

from edgescope.engines import DeviceFacts
from edgescope.v1 import manifest_pb2

# x86-64 micro-architecture levels (the psABI's), by the /proc/cpuinfo flags each adds ("pni" is SSE3).
X86_LEVELS = (
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
)
# Features that change what integer and float kernels compute.
_X86_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8")
_ARM_FEATURES = ("asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2")
_CPUINFO = Path("/proc/cpuinfo")
_DEVICE_MODEL = Path("/proc/device-tree/model")  # Jetson and other boards name themselves here


def cpu_fields(cpuinfo: str) -> dict[str, str]:
    """The first processor's ``key: value`` lines."""
    found: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and key.strip() not in found:
            found[key.strip()] = value.strip()
    return found


def cpu_description(cpuinfo: str, architecture: str, board: str = "") -> manifest_pb2.Machine:
    """CPU model, instruction-set level and numeric features, from ``/proc/cpuinfo`` text."""
    fields = cpu_fields(cpuinfo)
    machine = manifest_pb2.Machine(architecture=architecture)
    if architecture in ("x86_64", "AMD64", "i686"):
        flags = set(fields.get("flags", "").split())
        machine.cpu = fields.get("model name", "") or platform.processor()
        level = "x86-64" if flags else ""
        for name, needed in X86_LEVELS:
            if not needed <= flags:
                break
            level = name
        machine.isa_level = level
        machine.isa_features.extend(f for f in _X86_FEATURES if f in flags)
    elif architecture in ("aarch64", "arm64"):
        features = set(fields.get("Features", "").split())
        part = " ".join(f"{k} {fields[k]}" for k in ("CPU implementer", "CPU part") if k in fields)
        machine.cpu = board or fields.get("model name", "") or part
        machine.isa_level = "aarch64"
        machine.isa_features.extend(f for f in _ARM_FEATURES if f in features)
    else:
        machine.cpu = platform.processor()
    return machine


def describe_machine(gpu: DeviceFacts | None = None) -> manifest_pb2.Machine:
    """This machine; with ``gpu``, also the GPU and TensorRT that ran the candidate."""
    cpuinfo = _CPUINFO.read_text(encoding="utf-8", errors="replace") if _CPUINFO.is_file() else ""
    board = _DEVICE_MODEL.read_text(errors="replace").strip("\x00\n ") if _DEVICE_MODEL.is_file() else ""
    machine = cpu_description(cpuinfo, platform.machine(), board)
    machine.os = f"{platform.system()} {platform.release()}"
    if gpu is not None:
        machine.gpu = gpu.gpu_name
        machine.compute_capability = gpu.cc
        machine.tensorrt_version = gpu.tensorrt_version
    return machine


def machine_summary(machine: manifest_pb2.Machine) -> str:
    """One line: ``AMD EPYC (x86_64, x86-64-v3, no AVX-512 VNNI/AVX-VNNI); NVIDIA H200 (9.0), TensorRT 10.x``."""
    parts = (
        [machine.architecture, machine.isa_level]
        if machine.isa_level != machine.architecture
        else [machine.architecture]
    )
    features = set(machine.isa_features)
    if machine.isa_level.startswith("x86-64"):
        vnni = [name for flag, name in (("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI")) if flag in features]
        parts.append(" + ".join(vnni) if vnni else "no VNNI")
    elif machine.isa_features:
        parts.append(" ".join(machine.isa_features))
    line = f"{machine.cpu or 'unknown CPU'} ({', '.join(p for p in parts if p)})"
    if machine.gpu:
        line += f"; {machine.gpu} (compute {machine.compute_capability}), TensorRT {machine.tensorrt_version}"
    return line
