"""Can this runtime serve what a manifest describes? Checked once, before a model serves a frame.

A manifest whose preprocessing cannot produce its model's input (no input
size, five mean values for a gray model, a zero standard deviation, an input
shape that disagrees with the preprocessing) or whose postprocessing names an
output the model does not have would fail every frame, and each failure would
read as the sender's fault. ``check_manifest`` refuses such a bundle when it
is loaded, saying what is inconsistent.
"""

from __future__ import annotations

import math

from edgescope.errors import BundleError
from edgescope.runtime.pipeline.preprocess import input_channels
from edgescope.runtime.pipeline.signal import spec_problems
from edgescope.runtime.pipeline.state import frame_input, frame_source, source_inputs
from edgescope.v1 import manifest_pb2


def check_manifest(manifest: manifest_pb2.ModelManifest) -> None:
    """Raise ``BundleError`` naming every inconsistency found (see the module docstring)."""
    problems = _preprocessing_problems(manifest) + _io_problems(manifest)
    if problems:
        raise BundleError(f"the manifest of {manifest.name or '(unnamed)'} is inconsistent: " + "; ".join(problems))


def _preprocessing_problems(manifest: manifest_pb2.ModelManifest) -> list[str]:
    spec = manifest.preprocessing
    problems = []
    if spec.height <= 0 or spec.width <= 0:
        problems.append(f"preprocessing input size is {spec.width}x{spec.height}")
    channels = input_channels(spec)
    for name, values in (("mean", spec.mean), ("std", spec.std)):
        if len(values) not in (0, 1, channels):
            problems.append(f"{len(values)} {name} values for a {channels}-channel input")
        if not all(math.isfinite(value) for value in values):
            problems.append(f"a {name} value is not finite")
    if any(value == 0 for value in spec.std):
        problems.append("a std value is 0")
    if not math.isfinite(spec.scale):
        problems.append("the scale is not finite")
    return problems


def _io_problems(manifest: manifest_pb2.ModelManifest) -> list[str]:
    if not manifest.inputs:
        return ["it declares no inputs"]
    if not manifest.outputs:
        return ["it declares no outputs"]
    problems = []
    spec = manifest.preprocessing
    name = frame_input(manifest)
    tensor = next((t for t in manifest.inputs if t.name == name), None)
    if tensor is None:
        return [f"the frame input {name!r} is not one of its inputs"]
    sizes = [dim.size if dim.WhichOneof("kind") == "size" else None for dim in tensor.shape]
    if len(sizes) == 4:
        nhwc = spec.layout == manifest_pb2.LAYOUT_NHWC
        expected = (
            (spec.height, spec.width, input_channels(spec)) if nhwc else (input_channels(spec), spec.height, spec.width)
        )
        actual = tuple(sizes[1:])
        if any(size is not None and size != want for size, want in zip(actual, expected, strict=True)):
            shown = "x".join("?" if size is None else str(size) for size in sizes)
            problems.append(
                f"input {name!r} has shape {shown}, the preprocessing makes {'x'.join(map(str, (1, *expected)))}"
            )
    problems.extend(_source_problems(manifest, {t.name for t in manifest.inputs}))
    wanted = manifest.postprocessing.output
    if wanted and wanted not in {output.name for output in manifest.outputs}:
        problems.append(f"postprocessing reads output {wanted!r}, which the model does not have")
    return problems


def _source_problems(manifest: manifest_pb2.ModelManifest, inputs: set[str]) -> list[str]:
    """A model fed by several sources: every source named once, every source input declared and sized."""
    bindings = source_inputs(manifest)
    if not bindings:
        return []
    problems = []
    names = [frame_source(manifest), *(b.source for b in bindings)]
    if not all(names) or len(set(names)) != len(names):
        problems.append(f"its sources must have distinct, non-empty names (frame first): {names}")
    for binding in bindings:
        if binding.input not in inputs:
            problems.append(f"source {binding.source!r} feeds {binding.input!r}, which is not one of its inputs")
        if binding.HasField("signal"):
            problems.extend(spec_problems(binding.source, binding.signal))
        elif binding.preprocessing.height <= 0 or binding.preprocessing.width <= 0:
            problems.append(
                f"source {binding.source!r} has input size {binding.preprocessing.width}x{binding.preprocessing.height}"
            )
    return problems
