"""TensorRT engine cache: which plan under a bundle's ``engines/`` fits this GPU.

An engine is tied to the GPU it was built on and the TensorRT that built it.
Each plan is named by its key, readable at a glance::

    engines/nvidia-rtx-a4000_sm86_48sm_trt10.16.1_fp16.plan
    engines/nvidia-rtx-a4000_sm86_48sm_trt10.16.1_fp16.json   (EngineEntry sidecar)

The plan stays a plain TensorRT plan (nothing prepended); the sidecar is the
``edgescope.v1.EngineEntry`` message in protobuf's JSON mapping, shared by
export (which writes it) and the runtime (which reads it). Device facts come
from cuda-python and TensorRT, imported only when asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from edgescope.bundle import ENGINES_DIR
from edgescope.errors import BundleError, MissingDependencyError
from edgescope.v1 import manifest_pb2

TENSORRT_HINT = "pip install 'edgescope[tensorrt]' (TensorRT and cuda-python for this CUDA version)"
GPU = -1
"""``dla_core`` of an engine that runs on the GPU rather than a DLA core."""

PRECISION_NAMES: dict[manifest_pb2.Precision.ValueType, str] = {
    manifest_pb2.PRECISION_FP32: "fp32",
    manifest_pb2.PRECISION_FP16: "fp16",
    manifest_pb2.PRECISION_INT8: "int8",
}


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What an engine is bound to: the GPU and the TensorRT that runs it."""

    gpu_name: str
    compute_capability: tuple[int, int]
    sm_count: int
    tensorrt_version: str

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


@dataclass(frozen=True, slots=True)
class EngineKey:
    """The cache key of one engine."""

    device: DeviceFacts
    precision: str
    dla_core: int = GPU

    @property
    def stem(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.device.gpu_name.lower()).strip("-") or "gpu"
        major, minor = self.device.compute_capability
        dla = "" if self.dla_core == GPU else f"_dla{self.dla_core}"
        return (
            f"{slug}_sm{major}{minor}_{self.device.sm_count}sm_trt{_short_version(self.device.tensorrt_version)}"
            f"_{self.precision}{dla}"
        )

    def plan_path(self, bundle_dir: Path) -> Path:
        return bundle_dir / ENGINES_DIR / f"{self.stem}.plan"

    def sidecar_path(self, bundle_dir: Path) -> Path:
        return bundle_dir / ENGINES_DIR / f"{self.stem}.json"


def _short_version(version: str) -> str:
    # 10.16.1.11 -> 10.16.1 keeps names short; the sidecar holds the full version the check compares.
    return ".".join(version.split(".")[:3])


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def write_sidecar(path: Path, entry: manifest_pb2.EngineEntry) -> None:
    path.write_text(json_format.MessageToJson(entry, indent=2) + "\n", encoding="utf-8")


def read_sidecar(path: Path) -> manifest_pb2.EngineEntry:
    entry = manifest_pb2.EngineEntry()
    try:
        json_format.Parse(path.read_text(encoding="utf-8"), entry)
    except (json_format.ParseError, OSError) as exc:
        raise BundleError(f"{path}: not a readable engine sidecar: {exc}") from exc
    return entry


def incompatibility(entry: manifest_pb2.EngineEntry, device: DeviceFacts) -> str | None:
    """Why the engine in ``entry`` cannot run on ``device``; None when it can."""
    built, here = _numbers(entry.tensorrt_version), _numbers(device.tensorrt_version)
    # A version-compatible engine runs on the same or a later TensorRT of its major version.
    if built != here and not (entry.version_compatible and built[:1] == here[:1] and here > built):
        return f"built with TensorRT {entry.tensorrt_version}, this device has TensorRT {device.tensorrt_version}"
    if entry.hardware_compatibility == "ampere_plus":
        if device.compute_capability[0] < 8:
            return f"built for Ampere and later GPUs, this GPU is compute capability {device.cc}"
        return None
    if entry.compute_capability != device.cc:
        return f"built for compute capability {entry.compute_capability}, this GPU is {device.cc}"
    if entry.hardware_compatibility != "same_compute_capability" and (
        entry.gpu_name != device.gpu_name or entry.sm_count != device.sm_count
    ):
        # TensorRT timed its tactics on that GPU; only hardware-compatible engines may move.
        return f"built on {entry.gpu_name} ({entry.sm_count} SMs), this is {device.gpu_name} ({device.sm_count} SMs)"
    return None


def engines_in(bundle_dir: Path) -> list[manifest_pb2.EngineEntry]:
    """Every engine sidecar under the bundle's ``engines/``, sorted by plan name."""
    folder = bundle_dir / ENGINES_DIR
    if not folder.is_dir():
        return []
    return sorted((read_sidecar(p) for p in folder.glob("*.json")), key=lambda e: e.plan)


def select_engine(
    bundle_dir: Path,
    device: DeviceFacts,
    precision: str,
    *,
    dla_core: int = GPU,
    allow_rebuild: bool = False,
) -> Path | None:
    """The plan to load for ``device``; None when none fits and the caller may rebuild.

    Raises BundleError naming each engine present and why it does not fit
    (another GPU, another TensorRT) when no rebuild is allowed.
    """
    reasons = []
    for entry in engines_in(bundle_dir):
        if PRECISION_NAMES.get(entry.precision) != precision or entry.dla_core != dla_core:
            continue
        reason = incompatibility(entry, device)
        if reason is None:
            plan = bundle_dir / entry.plan
            if not plan.is_file():
                raise BundleError(f"{bundle_dir}: sidecar names {entry.plan}, which is missing")
            return plan
        reasons.append(f"{entry.plan}: {reason}")
    if allow_rebuild:
        return None
    where = "GPU" if dla_core == GPU else f"DLA core {dla_core}"
    found = "; ".join(reasons) if reasons else "none is there"
    raise BundleError(
        f"{bundle_dir}: no {precision} TensorRT engine for {device.gpu_name} (compute capability {device.cc}, "
        f"TensorRT {device.tensorrt_version}, {where}): {found}. Build one on this device with "
        f"`edgescope engines {bundle_dir} --precision {precision}` or allow a rebuild at start"
    )


def cuda_runtime() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise MissingDependencyError("cuda-python", TENSORRT_HINT) from exc
    return runtime


def device_facts(device: int = 0) -> DeviceFacts:
    """The facts of CUDA device ``device`` and the installed TensorRT (imports both lazily)."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError("TensorRT", TENSORRT_HINT) from exc
    cudart = cuda_runtime()
    error, props = cudart.cudaGetDeviceProperties(device)
    if error != cudart.cudaError_t.cudaSuccess:
        raise MissingDependencyError(
            f"CUDA device {device}", f"cudaGetDeviceProperties failed ({error}); check the NVIDIA driver"
        )
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return DeviceFacts(
        gpu_name=name.rstrip("\x00").strip(),
        compute_capability=(int(props.major), int(props.minor)),
        sm_count=int(props.multiProcessorCount),
        tensorrt_version=str(tensorrt.__version__),
    )
