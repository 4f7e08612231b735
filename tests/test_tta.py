"""Flip test-time augmentation: the frame and its mirror image in one inference, averaged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from edgescope.bundle import MANIFEST_FILE, Bundle
from edgescope.cli import build_parser
from edgescope.errors import ConfigError
from edgescope.runtime.pipeline.confidence import segmentation_confidence
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.pipeline.encode import decode_mask
from edgescope.runtime.pipeline.postprocess import remove_small_components, to_frame_grid
from edgescope.runtime.pipeline.preprocess import preprocess
from edgescope.runtime.pipeline.tasks.common import sigmoid
from edgescope.runtime.pipeline.tta import FLIP, merge_flip
from edgescope.runtime.server.registry import ModelPolicy, MonitoringOptions
from edgescope.runtime.sources import open_source
from edgescope.v1 import manifest_pb2, stream_pb2, stream_pb2_grpc

from .conftest import ServerThread

FRAMES = 4


def _frames() -> list[np.ndarray]:
    with open_source("synthetic:ultrasound?seed=5") as source:
        frames = []
        for frame in source:
            frames.append(frame.pixels)
            if len(frames) == FRAMES:
                return frames
    return frames


def _stream(server: ServerThread, frames: list[np.ndarray]) -> list[stream_pb2.Result]:
    messages = [stream_pb2.Frame(stream_id="tta", seq=i, raw=encode_raw(f)) for i, f in enumerate(frames)]
    with grpc.insecure_channel(server.target) as channel:
        return list(stream_pb2_grpc.StreamServiceStub(channel).Stream(iter(messages), timeout=120))


def test_with_flip_the_mask_is_the_average_of_the_frame_and_its_mirror_image(example_bundle: Bundle) -> None:
    manifest = example_bundle.manifest
    params = manifest.postprocessing.segmentation
    assert params.activation == manifest_pb2.ACTIVATION_SIGMOID
    frames = _frames()
    served = ServerThread([example_bundle.path], monitoring=MonitoringOptions(tta={"*": FLIP}))
    try:
        results = _stream(served, frames)
    finally:
        served.stop()
    assert [r.seq for r in results] == list(range(FRAMES))
    assert all(r.status.code == stream_pb2.FRAME_STATUS_CODE_OK for r in results)

    session = ort.InferenceSession(str(example_bundle.path / "model.onnx"), providers=["CPUExecutionProvider"])
    changed = 0
    for frame, result in zip(frames, results, strict=True):
        tensor, geometry = preprocess(frame, manifest.preprocessing, None)
        own = session.run(None, {manifest.inputs[0].name: tensor})[0]
        mirrored = session.run(None, {manifest.inputs[0].name: tensor[..., ::-1].copy()})[0]
        # By hand: the probabilities averaged, the mirror image's flipped back, thresholded.
        probability = (sigmoid(own) + sigmoid(mirrored[..., ::-1])) / 2
        by_hand = (probability[0, 0] > params.threshold).astype(np.uint8)
        by_hand = to_frame_grid(remove_small_components(by_hand, params.min_component_pixels), geometry)
        mask = decode_mask(result.outputs[0].mask)
        # Pixels whose averaged probability is within float rounding of the threshold may fall either way.
        near = np.abs(probability[0, 0] - params.threshold) < 1e-4
        assert np.count_nonzero(mask != by_hand) <= np.count_nonzero(near)
        single = (own[0, 0] > 0).astype(np.uint8)
        changed += int(np.count_nonzero(single != (probability[0, 0] > params.threshold)))
        # The confidence is the averaged output's.
        merged = merge_flip({"logits": np.concatenate([own, mirrored])}, manifest)
        assert result.confidence == pytest.approx(segmentation_confidence(merged["logits"], params).frame, abs=1e-5)
    assert changed > 0  # the mirror image changed some pixels: flip really ran


def test_flip_is_refused_at_load_for_a_model_without_a_dynamic_batch_axis(
    example_bundle: Bundle, tmp_path: Path
) -> None:
    bundle = tmp_path / "static"
    shutil.copytree(example_bundle.path, bundle)
    written = json.loads((bundle / MANIFEST_FILE).read_text())
    written["inputs"][0]["shape"][0] = {"size": "1"}
    (bundle / MANIFEST_FILE).write_text(json.dumps(written))
    with pytest.raises(ConfigError, match="no dynamic batch axis"):
        ServerThread([bundle], monitoring=MonitoringOptions(tta={"lesion-unet": FLIP}))


def test_tta_is_set_per_model_with_a_default_for_the_rest() -> None:
    args = build_parser().parse_args(["serve", "b", "--tta", "flip", "--tta", "other=off"])
    options = MonitoringOptions(tta=dict(args.tta))
    assert options.policy("lesion-unet") == ModelPolicy(tta=FLIP)
    assert options.policy("other") == ModelPolicy(tta="off")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "b", "--tta", "rotate"])
