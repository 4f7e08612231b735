from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgescope.runtime.pipeline.calibration import max_diameter
from edgescope.runtime.pipeline.postprocess import postprocess, remove_small_components
from edgescope.runtime.pipeline.preprocess import Geometry
from edgescope.v1 import manifest_pb2, stream_pb2


def _manifest(min_pixels: int = 0) -> manifest_pb2.ModelManifest:
    return manifest_pb2.ModelManifest(
        task=manifest_pb2.TASK_SEGMENTATION,
        labels=["background", "lesion"],
        outputs=[manifest_pb2.TensorSpec(name="logits")],
        postprocessing=manifest_pb2.Postprocessing(
            output="logits",
            segmentation=manifest_pb2.SegmentationParams(
                activation=manifest_pb2.ACTIVATION_SIGMOID, threshold=0.5, min_component_pixels=min_pixels
            ),
        ),
    )


def _quantities(result_quantities: list[stream_pb2.Quantity]) -> dict[str, tuple[float, str]]:
    return {q.name: (q.value, q.unit) for q in result_quantities}


def test_area_in_square_millimetres_uses_the_frame_grid_and_spacing() -> None:
    logits = np.full((1, 1, 32, 32), -8.0, dtype=np.float32)
    logits[0, 0, 8:16, 8:24] = 8.0  # an 8x16 lesion in a 32x32 model grid
    geometry = Geometry(frame_height=64, frame_width=128, top=0, left=0, height=32, width=32)
    spacing = stream_pb2.PixelSpacing(row_mm=0.5, column_mm=0.25)
    task = postprocess({"logits": logits}, _manifest(), geometry, spacing)
    assert task.mask is not None and task.mask.shape == (64, 128)
    frame_pixels = (8 * 2) * (16 * 4)  # the lesion scaled by 2 rows and 4 columns
    q = _quantities(task.quantities)
    assert q["lesion_area_pixels"] == (frame_pixels, "px")
    assert q["lesion_area"][0] == pytest.approx(frame_pixels * 0.5 * 0.25)
    assert q["lesion_area"][1] == "mm2"
    assert q["lesion_count"] == (1.0, "1")


def test_without_spacing_the_area_is_said_in_pixels() -> None:
    logits = np.full((1, 1, 8, 8), 5.0, dtype=np.float32)
    task = postprocess({"logits": logits}, _manifest(), Geometry(8, 8, 0, 0, 8, 8), None)
    q = {q.name: q for q in task.quantities}
    assert (q["lesion_area"].value, q["lesion_area"].unit, q["lesion_area"].region) == (64, "px", "")
    assert {u.unit for u in task.quantities} == {"1", "px"}
    assert q["lesion_max_diameter"].value == pytest.approx(np.hypot(7, 7))


def test_small_components_are_removed() -> None:
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[1:3, 1:3] = 1  # 4 px speck
    mask[10:16, 10:16] = 1  # 36 px lesion
    cleaned = remove_small_components(mask, 10)
    assert cleaned[1:3, 1:3].sum() == 0
    assert cleaned[10:16, 10:16].all()


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.9])
def test_logit_threshold_equals_sigmoid_threshold(threshold: float) -> None:
    from edgescope.runtime.pipeline.postprocess import segmentation_mask

    logits = (np.random.default_rng(1).standard_normal((1, 1, 64, 64)) * 4).astype(np.float32)
    params = manifest_pb2.SegmentationParams(activation=manifest_pb2.ACTIVATION_SIGMOID, threshold=threshold)
    expected = (1.0 / (1.0 + np.exp(-logits[0, 0].astype(np.float64))) > threshold).astype(np.uint8)
    np.testing.assert_array_equal(segmentation_mask(logits, params), expected)


def _diameter_by_brute_force(mask: np.ndarray, row_mm: float, column_mm: float) -> float:
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    longest = 0.0
    for label in range(1, count):
        rows, columns = np.nonzero(labels == label)
        points = np.stack([columns * column_mm, rows * row_mm], axis=-1)
        longest = max(longest, float(np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1)).max()))
    return longest


@pytest.mark.parametrize("seed", range(6))
def test_max_diameter_of_a_speckled_mask_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((48, 64)) > 0.93  # many specks, as an untrained or noisy model gives
    mask[5 + seed : 20 + seed, 10 : 30 + 2 * seed] = True  # and one part that is longest
    row_mm, column_mm = 0.3 + 0.1 * seed, 0.25
    expected = _diameter_by_brute_force(mask, row_mm, column_mm)
    assert max_diameter(mask, row_mm, column_mm) == pytest.approx(expected)
    assert max_diameter(np.zeros((8, 8), dtype=bool)) == 0.0
