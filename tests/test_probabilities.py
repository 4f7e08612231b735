"""Each label's probability with the mask: made only when the frame asks, at the mask's size and geometry."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.pipeline.encode import decode_mask, decode_probabilities, fill_result
from edgescope.runtime.pipeline.postprocess import postprocess
from edgescope.runtime.pipeline.preprocess import Geometry
from edgescope.runtime.sources.synthetic import SyntheticUltrasoundSource
from edgescope.v1 import manifest_pb2, stream_pb2, stream_pb2_grpc

from .conftest import ServerThread


def _manifest(activation: int, labels: list[str]) -> manifest_pb2.ModelManifest:
    return manifest_pb2.ModelManifest(
        task=manifest_pb2.TASK_SEGMENTATION,
        labels=labels,
        outputs=[manifest_pb2.TensorSpec(name="logits")],
        postprocessing=manifest_pb2.Postprocessing(
            output="logits", segmentation=manifest_pb2.SegmentationParams(activation=activation, threshold=0.5)
        ),
    )


# A 16x16 model grid letterboxed (rows 4..11 carry the frame) for a 16x32 frame.
GEOMETRY = Geometry(frame_height=16, frame_width=32, top=4, left=0, height=8, width=16)


def test_probabilities_are_made_only_when_asked() -> None:
    logits = np.full((1, 1, 16, 16), -6.0, np.float32)
    logits[0, 0, 6:10, 4:12] = 6.0
    manifest = _manifest(manifest_pb2.ACTIVATION_SIGMOID, ["background", "lesion"])
    plain = postprocess({"logits": logits}, manifest, GEOMETRY, None)
    assert plain.probabilities is None
    result = stream_pb2.Result()
    fill_result(result, plain, stream_pb2.MASK_ENCODING_PNG)
    assert list(result.outputs[0].mask.probability_png) == []
    asked = postprocess({"logits": logits}, manifest, GEOMETRY, None, want_probabilities=True)
    assert asked.probabilities is not None and asked.probabilities.shape == (1, 16, 32)
    result = stream_pb2.Result()
    fill_result(result, asked, stream_pb2.MASK_ENCODING_PNG)
    np.testing.assert_array_equal(decode_probabilities(result.outputs[0].mask), asked.probabilities)
    # The letterbox is cut off as for the mask: the lesion's rows 6..9 of the grid are rows 4..11 of the frame.
    mask = decode_mask(result.outputs[0].mask)
    assert mask[4:12, 8:24].all() and not mask[:2].any()
    assert asked.probabilities[0, 8, 16] == round(255 / (1 + np.exp(-6.0)))
    assert asked.probabilities[0, 0, 0] == round(255 / (1 + np.exp(6.0)))


@pytest.mark.parametrize("channels", [2, 3])
def test_softmax_gives_each_label_after_the_background_its_probability(channels: int) -> None:
    rng = np.random.default_rng(channels)
    logits = rng.normal(0.0, 3.0, (1, channels, 16, 16)).astype(np.float32)
    labels = ["background", "a", "b"][:channels]
    task = postprocess(
        {"logits": logits}, _manifest(manifest_pb2.ACTIVATION_SOFTMAX, labels), Geometry(16, 16, 0, 0, 16, 16),
        None, want_probabilities=True,
    )  # fmt: skip
    exp = np.exp(logits[0] - logits[0].max(axis=0))
    expected = np.rint(exp / exp.sum(axis=0) * 255)[1:]
    assert task.probabilities is not None
    np.testing.assert_allclose(task.probabilities, expected, atol=1)


def test_other_tasks_make_no_probabilities() -> None:
    manifest = manifest_pb2.ModelManifest(
        task=manifest_pb2.TASK_CLASSIFICATION, labels=["a", "b"], outputs=[manifest_pb2.TensorSpec(name="logits")]
    )
    task = postprocess({"logits": np.zeros((1, 2), np.float32)}, manifest, GEOMETRY, None, want_probabilities=True)
    assert task.probabilities is None


def test_infer_sends_probabilities_only_to_a_frame_that_asks(server: ServerThread) -> None:
    pixels = next(iter(SyntheticUltrasoundSource(seed=3, n_frames=1).frames_with_masks()))[0].pixels
    with grpc.insecure_channel(server.target) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        plain = stub.Infer(stream_pb2.Frame(stream_id="p", model="lesion-unet", raw=encode_raw(pixels)), timeout=60)
        asked = stub.Infer(
            stream_pb2.Frame(stream_id="p", model="lesion-unet", raw=encode_raw(pixels), want_probabilities=True),
            timeout=60,
        )
    assert plain.status.code == asked.status.code == stream_pb2.FRAME_STATUS_CODE_OK
    assert list(plain.outputs[0].mask.probability_png) == []
    probabilities = decode_probabilities(asked.outputs[0].mask)
    assert probabilities.shape == (1, *pixels.shape[:2])
    # The same answer either way: asking adds the probabilities and changes nothing else.
    np.testing.assert_array_equal(decode_mask(asked.outputs[0].mask), decode_mask(plain.outputs[0].mask))
