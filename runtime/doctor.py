"""``edgescope doctor``: what this device can run, and what is missing.

Each probe looks at one thing (CPU instruction set, GPU and driver, CUDA,
TensorRT, GPU telemetry, ONNX Runtime, the backends, a bundle's engines, the
ports) and answers a ``Check``. A probe never raises: what it cannot find is
reported as missing with how to get it, and a probe that fails is reported as
an error. Heavy imports (tensorrt, cuda-python, pynvml) happen inside the
probes that need them.
"""

from __future__ import annotations

import errno
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from edgescope import __version__
from edgescope.engines import PRECISION_NAMES, TENSORRT_HINT, device_facts, engines_in, incompatibility
from edgescope.runtime.evaluation.machine import X86_LEVELS, cpu_fields
from edgescope.runtime.telemetry.jetson import JETSON_RELEASE

OK, MISSING, WARNING, ERROR = "ok", "missing", "warning", "error"

# Below these flags a CPU is not even x86-64-v1; the levels above it are the evaluation reports' own.
X86_BASELINE = frozenset({"cmov", "cx8", "fpu", "fxsr", "mmx", "sse", "sse2"})
# Features that change what inference code can use, with the names people know them by.
X86_FEATURES = {
    "avx2": "AVX2",
    "fma": "FMA",
    "f16c": "F16C",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16",
    "amx_int8": "AMX INT8",
    "amx_bf16": "AMX BF16",
}
ARM_FEATURES = {
    "asimd": "NEON",
    "asimdhp": "FP16 SIMD",
    "asimddp": "int8 dot product",
    "i8mm": "int8 matrix multiply",
    "bf16": "BF16",
    "sve": "SVE",
    "sve2": "SVE2",
}
CPUINFO = Path("/proc/cpuinfo")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


def x86_level(flags: set[str] | frozenset[str]) -> str | None:
    """The highest x86-64 level whose every flag (and every lower level's) is present."""
    if not flags >= X86_BASELINE:
        return None
    level = "x86-64-v1"
    for name, needed in X86_LEVELS:
        if not needed <= flags:
            break
        level = name
    return level


def cpu_check(cpuinfo: str | None = None, machine: str | None = None) -> Check:
    machine = machine or platform.machine()
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    fields = cpu_fields(cpuinfo)
    cores = os.cpu_count() or 0
    details: dict[str, Any] = {"machine": machine, "logical_cores": cores}
    if machine in ("x86_64", "AMD64"):
        flags = set(fields.get("flags", "").split())
        model = fields.get("model name", platform.processor() or "unknown x86-64 CPU")
        if not flags:
            return Check("cpu", WARNING, f"{model}: instruction set unknown (no /proc/cpuinfo flags)", details)
        level = x86_level(flags)
        present = [label for flag, label in X86_FEATURES.items() if flag in flags]
        details |= {"model": model, "isa_level": level, "features": present, "avx512_vnni": "avx512_vnni" in flags}
        vnni = "AVX-512 VNNI" if "avx512_vnni" in flags else ("AVX-VNNI" if "avx_vnni" in flags else "no VNNI")
        summary = f"{model}, {cores} threads, {level or 'below x86-64-v1'} ({', '.join(present) or 'SSE only'}; {vnni})"
        return Check("cpu", OK, summary, details)
    if machine in ("aarch64", "arm64"):
        features = set(fields.get("Features", "").split())
        model = _device_model() or fields.get("model name", "") or "aarch64 CPU"
        present = [label for flag, label in ARM_FEATURES.items() if flag in features]
        details |= {"model": model, "features": present}
        status = OK if features else WARNING
        listed = ", ".join(present) if features else "features unknown (no /proc/cpuinfo Features)"
        return Check("cpu", status, f"{model}, {cores} cores, aarch64 ({listed})", details)
    return Check("cpu", WARNING, f"{machine}: not a CPU edgescope is built and tested for", details)


def _device_model() -> str:
    try:
        return DEVICE_TREE_MODEL.read_text(encoding="utf-8", errors="replace").strip("\x00\n ")
    except OSError:
        return ""


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def platform_check() -> Check:
    details = {
        "os": platform.system(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "edgescope": __version__,
    }
    summary = f"{details['os']} {details['kernel']} {platform.machine()}, Python {details['python']}"
    return Check("platform", OK, f"{summary}, edgescope {__version__}", details)


def memory_check() -> Check:
    import psutil

    memory = psutil.virtual_memory()
    details = {"total_bytes": int(memory.total), "available_bytes": int(memory.available)}
    gib = 1024**3
    return Check("memory", OK, f"{memory.total / gib:.1f} GiB, {memory.available / gib:.1f} GiB available", details)


def nvml_gpus(nvml: Any = None) -> Check:
    """NVIDIA GPUs through NVML (the driver's library): names, compute capability, memory, driver and CUDA."""
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            return Check("gpu", MISSING, "nvidia-ml-py is not installed (pip install nvidia-ml-py)")
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return Check("gpu", MISSING, f"no NVIDIA GPU: NVML could not start ({exc}); no driver, or no GPU")
    try:
        driver = str(nvml.nvmlSystemGetDriverVersion())
        cuda = int(nvml.nvmlSystemGetCudaDriverVersion())
        gpus: list[dict[str, Any]] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(
                {
                    "index": index,
                    "name": str(nvml.nvmlDeviceGetName(handle)),
                    "compute_capability": f"{major}.{minor}",
                    "memory_bytes": int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                }
            )
    except nvml.NVMLError as exc:
        return Check("gpu", ERROR, f"NVML started but failed to describe the GPUs ({exc})")
    finally:
        nvml.nvmlShutdown()
    details = {"driver": driver, "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}", "gpus": gpus}
    if not gpus:
        return Check("gpu", MISSING, f"driver {driver} but no GPU", details)
    named = ", ".join(
        f"{g['name']} (sm {g['compute_capability']}, {g['memory_bytes'] / 1024**3:.0f} GiB)" for g in gpus
    )
    return Check("gpu", OK, f"{named}; driver {driver}, CUDA {details['cuda_driver']}", details)


def jetson_check() -> Check | None:
    """A Jetson's integrated GPU (no NVML there): the board and its L4T release, or None off Jetson."""
    try:
        release = JETSON_RELEASE.read_text(encoding="utf-8", errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    details = {"model": _device_model(), "l4t": release.lstrip("# ").strip()}
    return Check("gpu", OK, f"{details['model'] or 'Jetson'}: integrated GPU, {details['l4t']}", details)


def telemetry_check(gpu: Check) -> Check:
    """Where the server's GPU telemetry would come from."""
    if gpu.status == OK and "gpus" in gpu.details:
        return Check("gpu telemetry", OK, "NVML", {"source": "nvml"})
    if gpu.status == OK:  # Jetson
        found = shutil.which("tegrastats")
        if found:
            return Check("gpu telemetry", OK, f"tegrastats ({found})", {"source": "tegrastats"})
        return Check("gpu telemetry", MISSING, "Jetson without tegrastats on PATH", {"source": "none"})
    return Check("gpu telemetry", MISSING, "no GPU telemetry (no NVML, not a Jetson); host telemetry only")


def cuda_check() -> Check:
    """cuda-python and the CUDA runtime it finds."""
    if importlib.util.find_spec("cuda") is None:
        return Check("cuda runtime", MISSING, f"cuda-python is not installed: {TENSORRT_HINT}")
    from edgescope.engines import cuda_runtime
    from edgescope.errors import EdgescopeError

    try:
        cudart = cuda_runtime()
        error, version = cudart.cudaRuntimeGetVersion()
        count_error, count = cudart.cudaGetDeviceCount()
    except (EdgescopeError, RuntimeError, OSError) as exc:
        return Check("cuda runtime", ERROR, f"cuda-python is installed but the CUDA runtime failed: {exc}")
    if error != cudart.cudaError_t.cudaSuccess:
        return Check("cuda runtime", ERROR, f"the CUDA runtime did not answer ({error})")
    runtime = f"{version // 1000}.{version % 1000 // 10}"
    details = {"runtime": runtime, "cuda_python": _version("cuda-python")}
    if count_error != cudart.cudaError_t.cudaSuccess or count == 0:
        return Check("cuda runtime", MISSING, f"CUDA runtime {runtime}, but no CUDA device ({count_error})", details)
    return Check("cuda runtime", OK, f"CUDA runtime {runtime}, {count} device(s)", details | {"devices": count})


def tensorrt_check() -> Check:
    if importlib.util.find_spec("tensorrt") is None:
        return Check("tensorrt", MISSING, f"TensorRT is not installed: {TENSORRT_HINT}")
    try:
        import tensorrt
    except (ImportError, OSError) as exc:
        return Check("tensorrt", ERROR, f"TensorRT is installed but does not import ({exc})")
    version = str(tensorrt.__version__)
    return Check("tensorrt", OK, f"TensorRT {version}", {"version": version})


def onnxruntime_check() -> Check:
    try:
        import onnxruntime
    except ImportError as exc:
        return Check("onnxruntime", MISSING, f"ONNX Runtime does not import ({exc}): pip install onnxruntime")
    providers = list(onnxruntime.get_available_providers())
    details = {"version": onnxruntime.__version__, "providers": providers}
    return Check("onnxruntime", OK, f"ONNX Runtime {onnxruntime.__version__}: {', '.join(providers)}", details)


def backends_check(checks: Mapping[str, Check]) -> Check:
    """Which ``serve --backend`` choices work here, and for those that do not, why."""
    onnx = checks.get("onnxruntime")
    usable: dict[str, str] = {}
    missing: dict[str, str] = {}
    if onnx is not None and onnx.status == OK:
        usable["onnxruntime"] = ", ".join(onnx.details["providers"])
    else:
        missing["onnxruntime"] = onnx.summary if onnx else "not probed"
    needs = [checks[name] for name in ("gpu", "cuda runtime", "tensorrt") if name in checks]
    if needs and all(check.status == OK for check in needs):
        usable["tensorrt"] = checks["tensorrt"].summary
    else:
        missing["tensorrt"] = "; ".join(c.summary for c in needs if c.status != OK) or "not probed"
    if _version("tritonclient") is not None:
        usable["remote"] = f"tritonclient {_version('tritonclient')}"
    else:
        missing["remote"] = "tritonclient is not installed: pip install 'edgescope[remote]'"
    summary = f"can run: {', '.join(usable) or 'nothing'}" + (f"; cannot: {', '.join(missing)}" if missing else "")
    return Check("backends", OK if usable else ERROR, summary, {"usable": usable, "missing": missing})


def export_check() -> Check:
    versions = {name: _version(name) for name in ("torch", "onnx", "onnxscript", "monai")}
    if versions["torch"] is None:
        return Check("export", MISSING, "torch is not installed: pip install 'edgescope[export]'", versions)
    listed = ", ".join(f"{name} {version}" for name, version in versions.items() if version)
    return Check("export", OK, listed, versions)


def engines_check(bundle: Path) -> Check:
    """The bundle's TensorRT engines and whether each fits this GPU and TensorRT."""
    name = f"engines {bundle}"
    from edgescope.errors import EdgescopeError

    try:
        entries = engines_in(bundle)
    except EdgescopeError as exc:
        return Check(name, ERROR, str(exc))
    onnx = (bundle / "model.onnx").is_file()
    fallback = "model.onnx runs on onnxruntime" if onnx else "no model.onnx"
    if not entries:
        return Check(name, OK if onnx else MISSING, f"no TensorRT engine; {fallback}", {"onnx": onnx})
    try:
        facts = device_facts()
    except EdgescopeError as exc:
        plans = [entry.plan for entry in entries]
        summary = f"{len(entries)} engine(s), cannot match them here: {exc}; {fallback}"
        return Check(name, WARNING, summary, {"engines": plans, "onnx": onnx})
    fits: list[str] = []
    reasons: dict[str, str] = {}
    for entry in entries:
        reason = incompatibility(entry, facts)
        label = f"{entry.plan} ({PRECISION_NAMES.get(entry.precision, '?')})"
        if reason is None:
            fits.append(label)
        else:
            reasons[label] = reason
    details = {"matching": fits, "not_matching": reasons, "onnx": onnx, "device": asdict(facts)}
    if fits:
        return Check(name, OK, f"runs here: {', '.join(fits)}", details)
    why = "; ".join(f"{plan}: {reason}" for plan, reason in reasons.items())
    hint = f"build one with `edgescope engines {bundle}`"
    return Check(name, WARNING, f"no engine for this device ({why}); {hint}; {fallback}", details)


def threading_check(bundle: Path) -> Check:
    """How ONNX Runtime's threads would run the bundle's model here, measured as the server measures it at load."""
    name = f"threads {bundle}"
    from edgescope.bundle import load_bundle
    from edgescope.errors import EdgescopeError
    from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend

    try:
        session = OnnxRuntimeBackend().load(load_bundle(bundle))
    except EdgescopeError as exc:
        return Check(name, ERROR, f"cannot load it on onnxruntime: {exc}")
    with session:
        chosen = session.threading
    if chosen is None:
        return Check(name, WARNING, "onnxruntime chose its threads itself")
    details = {"intra_op_threads": chosen.threads, "spinning_within_runs": chosen.spinning, "why": chosen.reason}
    return Check(name, OK, f"onnxruntime: {chosen.describe()}", details)


def port_check(host: str, port: int, what: str) -> Check:
    name = f"port {port}"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return Check(name, WARNING, f"{host}:{port} ({what}) is in use: stop what holds it or pick another port")
        return Check(name, ERROR, f"{host}:{port} ({what}) cannot be bound: {exc.strerror or exc}")
    return Check(name, OK, f"{host}:{port} ({what}) is free", {"host": host, "port": port})


def _safely(name: str, probe: Callable[[], Check]) -> Check:
    try:
        return probe()
    except Exception as exc:  # a probe must never take the report down with it
        return Check(name, ERROR, f"the probe failed: {type(exc).__name__}: {exc}")


def run_checks(
    bundles: Sequence[Path] = (), host: str = "127.0.0.1", ports: Sequence[tuple[int, str]] = ()
) -> list[Check]:
    """Every probe, in the order a person reads them."""
    checks: dict[str, Check] = {}
    for check in (
        _safely("platform", platform_check),
        _safely("cpu", cpu_check),
        _safely("memory", memory_check),
        _safely("gpu", lambda: jetson_check() or nvml_gpus()),
    ):
        checks[check.name] = check
    checks["gpu telemetry"] = _safely("gpu telemetry", lambda: telemetry_check(checks["gpu"]))
    for name, probe in (
        ("cuda runtime", cuda_check),
        ("tensorrt", tensorrt_check),
        ("onnxruntime", onnxruntime_check),
        ("export", export_check),
    ):
        checks[name] = _safely(name, probe)
    checks["backends"] = _safely("backends", lambda: backends_check(checks))
    ordered = list(checks.values())
    ordered += [_safely(f"engines {bundle}", partial(engines_check, bundle)) for bundle in bundles]
    if checks["onnxruntime"].status == OK:
        ordered += [_safely(f"threads {bundle}", partial(threading_check, bundle)) for bundle in bundles]
    ordered += [_safely(f"port {port}", partial(port_check, host, port, what)) for port, what in ports]
    return ordered


def format_report(checks: Sequence[Check]) -> str:
    width = max(len(check.name) for check in checks)
    lines = ["edgescope doctor: what this device can run"]
    lines += [f"  {check.status:<8} {check.name:<{width}}  {check.summary}" for check in checks]
    return "\n".join(lines)


def as_json(checks: Sequence[Check]) -> dict[str, Any]:
    return {
        "edgescope": __version__,
        "python": sys.version.split()[0],
        "checks": [asdict(check) for check in checks],
    }
