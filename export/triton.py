"""A Triton Inference Server model repository from a bundle (``--format triton``).

Written inside the bundle (so its files are hashed with the rest)::

    triton/<name>/config.pbtxt            platform onnxruntime_onnx
    triton/<name>/<version>/model.onnx
    triton/<name>-tensorrt/config.pbtxt   platform tensorrt_plan, one plan per
    triton/<name>-tensorrt/<version>/*.plan  compute capability (cc_model_filenames)

config.pbtxt is the text form of Triton's ``inference.ModelConfig``; it is
written by hand so edgescope needs no Triton package, and the tests parse it
with the ModelConfig protobuf that ships in tritonclient.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgescope.bundle import ENGINES_DIR, ONNX_FILE, Bundle, write_manifest
from edgescope.errors import ConfigError, ExportError
from edgescope.kserve.datatypes import batches
from edgescope.v1 import manifest_pb2

REPOSITORY_DIR = "triton"
_TYPES: dict[manifest_pb2.DataType.ValueType, str] = {
    manifest_pb2.DATA_TYPE_FLOAT32: "TYPE_FP32",
    manifest_pb2.DATA_TYPE_FLOAT16: "TYPE_FP16",
    manifest_pb2.DATA_TYPE_INT8: "TYPE_INT8",
    manifest_pb2.DATA_TYPE_UINT8: "TYPE_UINT8",
    manifest_pb2.DATA_TYPE_UINT16: "TYPE_UINT16",
    manifest_pb2.DATA_TYPE_INT32: "TYPE_INT32",
    manifest_pb2.DATA_TYPE_INT64: "TYPE_INT64",
    manifest_pb2.DATA_TYPE_BOOL: "TYPE_BOOL",
}


@dataclass(frozen=True, slots=True)
class TritonOptions:
    max_batch_size: int = 8
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 100
    instances: int = 1
    kind: str = "KIND_GPU"
    gpus: tuple[int, ...] = ()


def _tensor(spec: manifest_pb2.TensorSpec, batched: bool) -> str:
    if spec.dtype not in _TYPES:
        raise ExportError(f"tensor {spec.name} has a data type Triton configs cannot name")
    dims = spec.shape[1:] if batched else spec.shape
    sizes = ", ".join(str(d.size) if d.WhichOneof("kind") == "size" else "-1" for d in dims)
    return f'  {{\n    name: "{spec.name}"\n    data_type: {_TYPES[spec.dtype]}\n    dims: [ {sizes} ]\n  }}'


def model_config(
    manifest: manifest_pb2.ModelManifest,
    options: TritonOptions,
    *,
    name: str,
    platform: str,
    default_file: str,
    cc_files: dict[str, str] | None = None,
) -> str:
    """config.pbtxt text for one model of the repository."""
    batched = batches(manifest) and options.max_batch_size > 0
    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {options.max_batch_size if batched else 0}",
        f'default_model_filename: "{default_file}"',
        "input [\n" + ",\n".join(_tensor(t, batched) for t in manifest.inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor(t, batched) for t in manifest.outputs) + "\n]",
    ]
    if batched:
        preferred = ", ".join(str(b) for b in options.preferred_batch_sizes if b <= options.max_batch_size)
        lines.append(
            "dynamic_batching {\n"
            f"  preferred_batch_size: [ {preferred} ]\n"
            f"  max_queue_delay_microseconds: {options.max_queue_delay_us}\n"
            "}"
        )
    gpus = f"\n    gpus: [ {', '.join(map(str, options.gpus))} ]" if options.gpus and options.kind == "KIND_GPU" else ""
    lines.append(f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {options.kind}{gpus}\n  }}\n]")
    for cc, file in sorted((cc_files or {}).items()):
        lines.append(f'cc_model_filenames {{\n  key: "{cc}"\n  value: "{file}"\n}}')
    lines.append(f'parameters {{\n  key: "edgescope_version"\n  value: {{ string_value: "{manifest.version}" }}\n}}')
    return "\n".join(lines) + "\n"


def _place(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.unlink(missing_ok=True)
    try:
        os.link(source, destination)  # same bytes, no second copy on disk
    except OSError:
        shutil.copy2(source, destination)


def write_repository(bundle: Bundle, options: TritonOptions = TritonOptions()) -> list[Path]:
    """Write ``triton/`` into the bundle, re-hash the manifest, and return the config files written."""
    if options.kind not in ("KIND_GPU", "KIND_CPU"):
        raise ConfigError(f"Triton instance kind {options.kind!r} must be KIND_GPU or KIND_CPU")
    manifest = bundle.manifest
    version = manifest.version if manifest.version.isdigit() else "1"
    root = bundle.path / REPOSITORY_DIR
    shutil.rmtree(root, ignore_errors=True)
    onnx_model = root / manifest.name
    _place(bundle.onnx_path, onnx_model / version / ONNX_FILE)
    (onnx_model / "config.pbtxt").write_text(
        model_config(manifest, options, name=manifest.name, platform="onnxruntime_onnx", default_file=ONNX_FILE),
        encoding="utf-8",
    )
    written = [onnx_model / "config.pbtxt"]
    # Engines of the bundle's own precision, one per compute capability (the first by name when several).
    cc_files: dict[str, str] = {}
    for entry in manifest.engines:
        if entry.precision == manifest.precision and entry.dla_core < 0:
            cc_files.setdefault(entry.compute_capability, Path(entry.plan).name)
    if cc_files:
        plan_model = root / f"{manifest.name}-tensorrt"
        for file in cc_files.values():
            _place(bundle.path / ENGINES_DIR / file, plan_model / version / file)
        (plan_model / "config.pbtxt").write_text(
            model_config(
                manifest,
                options,
                name=plan_model.name,
                platform="tensorrt_plan",
                default_file=next(iter(sorted(cc_files.values()))),
                cc_files=cc_files,
            ),
            encoding="utf-8",
        )
        written.append(plan_model / "config.pbtxt")
    write_manifest(bundle.path, manifest)
    return written
