"""``edgescope export``: a PyTorch model to a validated bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgescope.commands.options import add_engine_options, add_gate_limits, engine_options, floats, gate_limits
from edgescope.errors import ConfigError


def _size(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    if not sep or not height.isdigit() or not width.isdigit():
        raise argparse.ArgumentTypeError(f"size {text!r} must look like HEIGHTxWIDTH, e.g. 256x256")
    return int(height), int(width)


def _pair(values: list[float], flag: str) -> tuple[float, float]:
    if len(values) != 2:
        raise ConfigError(f"{flag} takes two numbers, MIN,MAX")
    return values[0], values[1]


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("export", help="export a PyTorch model to a validated bundle")
    p.add_argument("--name", required=True, help="model name the runtime serves it under")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--factory", help="'package.module:build' or 'path/model.py:build' returning the nn.Module")
    p.add_argument("--weights", type=Path, help="state_dict file for the factory's model (loaded weights_only)")
    p.add_argument("--torchscript", type=Path, help="a TorchScript file instead of factory + weights")
    p.add_argument("--exported-program", type=Path, help="a torch.export .pt2 (dynamic batch) instead")
    p.add_argument("--version", default="1")
    p.add_argument("--description", default="")
    p.add_argument("--task", default="segmentation")
    p.add_argument(
        "--precision",
        default="fp32",
        help="fp32, fp16 (graph converted, sensitive ops kept FP32) or int8 (Q/DQ, needs --calibration-data)",
    )
    p.add_argument("--input-size", type=_size, default=(256, 256), metavar="HxW")
    p.add_argument(
        "--color",
        choices=["gray", "rgb", "bgr"],
        help="how frames become the input: gray (default), rgb or bgr; leave out with --channels",
    )
    p.add_argument(
        "--channels",
        type=int,
        default=0,
        metavar="N",
        help="the input's channel count; frames of N channels are taken as sent, without colour conversion "
        "(multi-channel MR or ultrasound, feature maps; --mean/--std give one value per channel)",
    )
    p.add_argument("--resize", default="stretch", choices=["stretch", "letterbox"])
    p.add_argument("--scale", type=float, default=1.0 / 255.0)
    p.add_argument("--mean", type=floats, default=[], help="subtracted after --scale: one value, or one per channel")
    p.add_argument("--std", type=floats, default=[], help="divides after --mean: one value, or one per channel")
    p.add_argument(
        "--intensity",
        default="presentation",
        choices=["presentation", "modality", "stored"],
        help="DICOM frames: grey levels as displayed (modality LUT, window, MONOCHROME1), modality values "
        "(e.g. HU) or stored values",
    )
    p.add_argument("--voi", default="", help="DICOM window or VOI LUT the model expects: explanation or position")
    p.add_argument("--labels", default="background,lesion", help="comma-separated, background first")
    p.add_argument(
        "--label-codes",
        type=Path,
        metavar="FILE",
        help="segmentation, classification, detection: each label's DICOM category and type (.json or .toml: "
        "label -> {category: [value, scheme, meaning], type: [...]}); default: lesion as a lesion, others as "
        "tissue (segments), the local scheme 99EDGESCOPE (findings)",
    )
    p.add_argument("--activation", default="sigmoid", choices=["sigmoid", "softmax", "none"])
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--min-component-pixels", type=int, default=0)
    p.add_argument("--input-name", default="image", help="the graph's frame input")
    p.add_argument("--output-name", default="logits", help="the task output (boxes, for detection)")
    p.add_argument(
        "--output",
        default="",
        metavar="NAME|INDEX[,...]",
        help="a model returning a tuple or dict: which returned value is the task output (then detection "
        "scores and next states), by position or name; the others are dropped from the graph",
    )
    p.add_argument(
        "--static-batch",
        action="store_true",
        help="fix the batch axis at one frame, for models that cannot export with a dynamic batch "
        "(no batching across streams)",
    )
    p.add_argument("--previous-frame-input", default="", help="registration: input fed with the previous frame")
    p.add_argument(
        "--state", action="append", default=[], metavar="IN:OUT:D1,D2,..", help="a recurrent state tensor (repeatable)"
    )
    p.add_argument(
        "--frame-source",
        default="",
        metavar="NAME",
        help="a model fed by several sources: the name of the source whose frames feed the frame input",
    )
    p.add_argument(
        "--source-input",
        action="append",
        default=[],
        metavar="NAME:HxW:COLOR=DATA",
        help="another source's input, after the frame input in the model's arguments (repeatable): its name, "
        "input size, colour (gray, rgb, bgr) and the frames the gate runs it on, e.g. "
        "nir:128x128:gray=synthetic:fluorescence; or a 1-D signal, NAME:signal:CHANNELSxSAMPLES@RATEHz"
        "[:UNITS][:MEAN/STD]=DATA, e.g. ecg:signal:1x256@250Hz=synthetic:ecg",
    )
    p.add_argument("--scores-output", default="scores", help="detection: the class-score output")
    p.add_argument("--box-format", default="xyxy", choices=["xyxy", "xywh", "cxcywh"])
    p.add_argument("--score-threshold", type=float, default=0.5, help="detection: lowest box score kept")
    p.add_argument("--iou-threshold", type=float, default=0.5, help="detection: NMS overlap limit")
    p.add_argument("--max-boxes", type=int, default=100)
    p.add_argument("--anomaly-threshold", type=float, default=0.01, help="anomaly: score that flags a frame")
    p.add_argument("--heatmap", default="fixed", choices=["fixed", "per-frame"])
    p.add_argument("--heatmap-max", type=float, default=0.1, help="anomaly: error shown at full heat (fixed)")
    p.add_argument("--output-range", type=floats, default=[0.0, 1.0], help="image: output MIN,MAX mapped to 0..255")
    p.add_argument("--displacement-units", default="pixels", choices=["pixels", "mm"])
    p.add_argument(
        "--data", default="synthetic:ultrasound", help="validation frames: dicom:PATH, video:PATH, synthetic:ultrasound"
    )
    p.add_argument("--samples", type=int, help="frames the gate runs (default: 16 for fp32, 48 for fp16 and int8)")
    add_gate_limits(p)
    p.add_argument(
        "--golden-frames", type=int, default=8, help="of the gate's frames, how many every device self-tests on"
    )
    p.add_argument(
        "--reference-samples",
        type=int,
        default=96,
        help="frames of --data the domain profile is fitted on: every served frame is scored against it (0: none)",
    )
    p.add_argument(
        "--domain-false-alarm-rate",
        type=float,
        default=1e-3,
        help="share of in-domain frames the profile's threshold may call out of domain",
    )
    p.add_argument("--force", action="store_true", help="write the bundle even if the gate fails (marked failed)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--sign-key", type=Path, help="sign the bundle's manifest with this Ed25519 private key (PEM)")
    p.add_argument("--fp32-ops", help="fp16: comma-separated op types kept in FP32 (replaces the default list)")
    p.add_argument("--calibration-data", help="int8: dicom:PATH, video:PATH, synthetic:..., or a folder of images")
    p.add_argument("--calibration-samples", type=int, default=32)
    p.add_argument("--calibration-method", default="minmax", choices=["minmax", "entropy", "percentile"])
    p.add_argument(
        "--reduce-range",
        action="store_true",
        help="int8: weights in 7 bits, so onnxruntime's integer kernels on x86 CPUs without VNNI do not saturate",
    )
    p.add_argument(
        "--format", action="append", default=[], choices=["triton"], help="also write a Triton model repository"
    )
    p.add_argument(
        "--engines",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="build TensorRT engines (default: when TensorRT and a GPU are present)",
    )
    add_engine_options(p)


def run(args: argparse.Namespace) -> int:
    from edgescope.export import ExportRequest, export_model
    from edgescope.export.precision import FP16_FP32_OPS
    from edgescope.export.sources import parse_source_input
    from edgescope.export.tasks import StateSpec

    export_model(
        ExportRequest(
            name=args.name,
            output=args.out,
            factory=args.factory,
            weights=args.weights,
            torchscript=args.torchscript,
            exported_program=args.exported_program,
            version=args.version,
            description=args.description,
            task=args.task,
            precision=args.precision,
            input_height=args.input_size[0],
            input_width=args.input_size[1],
            color=args.color or ("channels" if args.channels else "gray"),
            channels=args.channels,
            model_outputs=tuple(v.strip() for v in args.output.split(",") if v.strip()),
            static_batch=args.static_batch,
            resize=args.resize,
            scale=args.scale,
            mean=args.mean,
            std=args.std,
            intensity=args.intensity,
            voi=args.voi,
            labels=[v for v in args.labels.split(",") if v],
            label_codes=args.label_codes,
            activation=args.activation,
            threshold=args.threshold,
            min_component_pixels=args.min_component_pixels,
            output_name=args.output_name,
            previous_frame_input=args.previous_frame_input,
            state=[StateSpec.parse(s) for s in args.state],
            input_name=args.input_name,
            frame_source=args.frame_source,
            source_inputs=[parse_source_input(s) for s in args.source_input],
            scores_output=args.scores_output,
            box_format=args.box_format,
            score_threshold=args.score_threshold,
            iou_threshold=args.iou_threshold,
            max_boxes=args.max_boxes,
            anomaly_threshold=args.anomaly_threshold,
            heatmap=args.heatmap,
            heatmap_max=args.heatmap_max,
            output_range=_pair(args.output_range, "--output-range"),
            displacement_units=args.displacement_units,
            data=args.data,
            samples=args.samples,
            limits=gate_limits(args),
            golden_frames=args.golden_frames,
            reference_samples=args.reference_samples,
            domain_false_alarm_rate=args.domain_false_alarm_rate,
            force=args.force,
            overwrite=args.overwrite,
            fp32_ops=tuple(v for v in args.fp32_ops.split(",") if v) if args.fp32_ops is not None else FP16_FP32_OPS,
            calibration_data=args.calibration_data,
            calibration_samples=args.calibration_samples,
            calibration_method=args.calibration_method,
            reduce_range=args.reduce_range,
            formats=("bundle", *args.format),
            engines=args.engines,
            engine_options=engine_options(args, None),
            sign_key=args.sign_key,
        )
    )
    return 0
