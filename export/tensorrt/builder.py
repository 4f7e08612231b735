"""Build a TensorRT engine from a bundle's ONNX graph and file it under ``engines/``.

Precision follows the TensorRT generation:

- TensorRT 11 networks are always strongly typed: the engine runs the
  precision of the bundle's graph (an FP16 or Q/DQ INT8 bundle from
  ``edgescope export --precision``). Asking for another precision is refused.
- TensorRT 10 builds a bundle's own precision the same way (strongly typed),
  or, from an FP32 bundle only, an FP16 engine by the FP16 builder flag or an
  INT8 engine by the INT8 flag and an entropy calibrator over frames from a
  source, with a calibration cache beside the engine.

FP32 engines clear the TF32 flag: TensorRT would otherwise run FP32
convolutions in TF32 on Ampere and later, a precision nobody asked for.

Every engine is gated right after it is built: the bundle's golden frames run
through it on this GPU with the evaluator the load self-test uses, and its
sidecar keeps the report. An engine that fails is deleted with the reason
(``force`` keeps it, marked failed; the server's self-test refuses it too).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgescope.bundle import ENGINES_DIR, Bundle, write_manifest
from edgescope.engines import GPU, PRECISION_NAMES, DeviceFacts, EngineKey, device_facts, write_sidecar
from edgescope.errors import ConfigError, EdgescopeError, ExportError, ValidationFailedError
from edgescope.export.tensorrt import _trt
from edgescope.runtime.evaluation.machine import describe_machine
from edgescope.runtime.evaluation.report import now
from edgescope.runtime.evaluation.runners import Runner, describe, tensorrt_info, tensorrt_runner
from edgescope.runtime.evaluation.selftest import format_self_test, self_test
from edgescope.v1 import manifest_pb2

if TYPE_CHECKING:
    import tensorrt as trt

Log = Callable[[str], None]
# Opens the built engine as a runner (the runtime's TensorRT session; a stand-in in tests).
EngineRunner = Callable[..., AbstractContextManager[Runner]]

HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
TRT10_ONLY = frozenset({"FP16", "INT8", "int8_calibrator", "set_calibration_profile"})
"""TensorRT names used here that exist in TensorRT 10 only (checked by tests/test_tensorrt_api.py)."""


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """How to build one engine; ``precision`` None means the bundle's own."""

    precision: str | None = None
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_mib: int = 1024
    optimization_level: int = 3
    timing_cache: Path | None = None
    dla_core: int = GPU
    gpu_fallback: bool = False
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    calibration_data: str | None = None
    calibration_samples: int = 32
    device: int = 0
    # Keep an engine that fails its golden-frame gate, marked failed in its sidecar.
    force: bool = False


def _plan(bundle: Bundle, options: EngineOptions, generation: int) -> tuple[str, bool]:
    """(engine precision, strongly typed), or a ConfigError saying why the request cannot be built as asked."""
    own = PRECISION_NAMES.get(bundle.manifest.precision, "fp32")
    wanted = options.precision or own
    if wanted == own:
        return wanted, True
    if generation >= 11:
        raise ConfigError(
            f"TensorRT 11 takes precision from the ONNX graph; this bundle is {own}, so it cannot build a {wanted} "
            f"engine. Export a {wanted} bundle (edgescope export --precision {wanted}) and build from it"
        )
    if own != "fp32" or wanted not in ("fp16", "int8"):
        raise ConfigError(f"TensorRT 10 builds {wanted} engines from an fp32 bundle only; this bundle is {own}")
    if wanted == "int8" and not options.calibration_data:
        raise ConfigError(
            "an INT8 engine from an fp32 bundle needs calibration frames: pass --calibration-data "
            "(or export an int8 bundle, whose Q/DQ graph carries its own scales)"
        )
    return wanted, False


def _check_options(options: EngineOptions) -> None:
    if not 1 <= options.min_batch <= options.opt_batch <= options.max_batch:
        raise ConfigError(
            f"batch profile must satisfy 1 <= min <= opt <= max, got "
            f"{options.min_batch}/{options.opt_batch}/{options.max_batch}"
        )
    if options.hardware_compatibility not in HARDWARE_COMPATIBILITY:
        raise ConfigError(
            f"hardware compatibility {options.hardware_compatibility!r} is not one of "
            f"{', '.join(HARDWARE_COMPATIBILITY)}"
        )
    if not 0 <= options.optimization_level <= 5:
        raise ConfigError(f"builder optimization level {options.optimization_level} is not in 0..5")


def _shapes(tensor_shape: trt.Dims, options: EngineOptions) -> tuple[tuple[int, ...], ...]:
    dims = list(tensor_shape)
    if any(d < 0 for d in dims[1:]):
        raise ExportError(f"only the batch axis may be dynamic for a TensorRT profile, the graph has {dims}")
    return tuple((batch, *dims[1:]) for batch in (options.min_batch, options.opt_batch, options.max_batch))


def _parse(
    builder: trt.Builder, logger: trt.ILogger, onnx_path: Path, strongly_typed: bool, generation: int
) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    import tensorrt as trt

    # TensorRT 11 networks are always strongly typed; on 10 it is asked for by flag.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed and generation == 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    # The parser keeps a reference into the network; keep both alive together.
    return network, parser


def _configure(
    builder: trt.Builder, network: trt.INetworkDefinition, options: EngineOptions, precision: str, strongly_typed: bool
) -> tuple[trt.IBuilderConfig, trt.IOptimizationProfile | None]:
    import tensorrt as trt

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    config.builder_optimization_level = options.optimization_level
    inputs = [network.get_input(index) for index in range(network.num_inputs)]
    # A graph whose batch is fixed (--static-batch) has no dynamic axis to profile.
    profile = None
    if any(d < 0 for tensor in inputs for d in tensor.shape):
        profile = builder.create_optimization_profile()
        for tensor in inputs:
            profile.set_shape(tensor.name, *_shapes(tensor.shape, options))
        config.add_optimization_profile(profile)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    elif not strongly_typed:
        # TensorRT 11 removed these flags; _plan takes this branch on 10 only, and the untyped view keeps
        # the module checkable against 11's API as well.
        flags_10: Any = trt.BuilderFlag
        config.set_flag(flags_10.FP16 if precision == "fp16" else flags_10.INT8)
    if options.dla_core != GPU:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        if options.gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    levels = {
        "none": trt.HardwareCompatibilityLevel.NONE,
        "ampere_plus": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
        "same_compute_capability": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY,
    }
    config.hardware_compatibility_level = levels[options.hardware_compatibility]
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    return config, profile


def build_engine(
    bundle: Bundle,
    options: EngineOptions = EngineOptions(),  # frozen, so sharing the default is safe
    *,
    device: DeviceFacts | None = None,
    log: Log = print,
    engine_runner: EngineRunner = tensorrt_runner,
) -> manifest_pb2.EngineEntry:
    """Build, gate on the golden frames, write ``engines/<key>.plan`` and its sidecar, and re-hash the manifest.

    Raises ValidationFailedError (and keeps nothing) when the engine fails its
    gate, unless ``options.force``.
    """
    _check_options(options)
    fixed = bundle.manifest.inputs[0].shape[0] if bundle.manifest.inputs else None
    if fixed is not None and fixed.WhichOneof("kind") == "size":
        # The graph takes exactly this batch; the engine's (and its calibrator's) batch is that one.
        options = replace(options, min_batch=fixed.size, opt_batch=fixed.size, max_batch=fixed.size)
    generation = _trt.require()
    import tensorrt as trt

    precision, strongly_typed = _plan(bundle, options, generation)
    device = device or device_facts(options.device)
    key = EngineKey(device, precision, options.dla_core)
    plan_path, sidecar_path = key.plan_path(bundle.path), key.sidecar_path(bundle.path)
    plan_path.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(builder, logger, bundle.onnx_path, strongly_typed, generation)
    config, profile = _configure(builder, network, options, precision, strongly_typed)
    calibration = manifest_pb2.CalibrationInfo()
    if precision == "int8" and not strongly_typed:
        from edgescope.export.precision import calibration_inputs
        from edgescope.export.tensorrt.calibrator import entropy_calibrator

        source = options.calibration_data or ""  # _plan refused an INT8 request without one
        frames = calibration_inputs(source, options.calibration_samples, bundle.manifest.preprocessing)
        cache = plan_path.with_suffix(".calibration")
        # Calibrators are TensorRT 10 only (_plan); reached untyped for the reason the flags are.
        config_10: Any = config
        config_10.int8_calibrator = entropy_calibrator(frames, options.opt_batch, cache)
        if profile is not None:
            config_10.set_calibration_profile(profile)
        calibration = manifest_pb2.CalibrationInfo(data_source=source, samples=len(frames), method="tensorrt entropy2")
    if options.timing_cache is not None:
        existing = options.timing_cache.read_bytes() if options.timing_cache.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(existing), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} could not build a {precision} engine (see its log above)")
    plan_path.write_bytes(bytes(serialized))
    if options.timing_cache is not None:
        options.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    entry = manifest_pb2.EngineEntry(
        plan=f"{ENGINES_DIR}/{plan_path.name}",
        gpu_name=device.gpu_name,
        compute_capability=device.cc,
        sm_count=device.sm_count,
        tensorrt_version=device.tensorrt_version,
        precision=manifest_pb2.Precision.Value(f"PRECISION_{precision.upper()}"),
        dla_core=options.dla_core,
        strongly_typed=strongly_typed,
        hardware_compatibility=options.hardware_compatibility,
        version_compatible=options.version_compatible,
        builder_optimization_level=options.optimization_level,
        workspace_bytes=options.workspace_mib << 20,
        min_batch=options.min_batch,
        opt_batch=options.opt_batch,
        max_batch=options.max_batch,
        onnx_sha256=bundle.onnx_sha256,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        calibration=calibration,
    )
    log(f"  {'build TensorRT ' + precision + ' engine':<34} {time.perf_counter() - start:7.2f} s  {entry.plan}")
    entry.self_test.CopyFrom(gate_engine(bundle, entry, options.device, describe_machine(device), engine_runner))
    log(format_self_test(entry.self_test))
    if not entry.self_test.passed and not options.force:
        plan_path.unlink()
        raise ValidationFailedError(
            f"{entry.plan} failed its golden-frame gate on {device.gpu_name} ({'; '.join(entry.self_test.reasons)}); "
            "it was not kept (pass force to keep it, marked failed)"
        )
    write_sidecar(sidecar_path, entry)
    record_engine(bundle, entry)
    return entry


def gate_engine(
    bundle: Bundle,
    entry: manifest_pb2.EngineEntry,
    device: int,
    machine: manifest_pb2.Machine,
    engine_runner: EngineRunner = tensorrt_runner,
) -> manifest_pb2.SelfTestReport:
    """The engine ``entry`` names, run on the bundle's golden frames; an engine that cannot even load fails."""
    try:
        with engine_runner(bundle, entry, device=device) as runner:
            return self_test(bundle, runner.infer, runner.info, machine=machine)
    except EdgescopeError as exc:
        info = tensorrt_info(entry, "", device)
        return manifest_pb2.SelfTestReport(
            passed=False,
            reasons=[f"{describe(info)} could not run: {exc}"],
            runner=info,
            machine=machine,
            created_at=now(),
        )


def record_engine(bundle: Bundle, entry: manifest_pb2.EngineEntry) -> None:
    """List ``entry`` in the manifest (replacing one with the same plan) and re-hash every file."""
    kept = [e for e in bundle.manifest.engines if e.plan != entry.plan]
    del bundle.manifest.engines[:]
    bundle.manifest.engines.extend([*kept, entry])
    write_manifest(bundle.path, bundle.manifest)
