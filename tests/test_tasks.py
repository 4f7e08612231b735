"""Task postprocessors and task metrics on hand-made outputs: NMS, box mapping, SSIM/PSNR, gate failures."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgescope.runtime.evaluation.limits import GateThresholds
from edgescope.runtime.evaluation.metrics import RAW_ERROR_METRICS, compare, psnr, ssim
from edgescope.runtime.pipeline.postprocess import postprocess
from edgescope.runtime.pipeline.preprocess import preprocess
from edgescope.runtime.pipeline.tasks.detection import box_iou, detect, nms, to_xyxy
from edgescope.v1 import manifest_pb2


def _detection_manifest(max_boxes: int = 10) -> manifest_pb2.ModelManifest:
    manifest = manifest_pb2.ModelManifest(task=manifest_pb2.TASK_DETECTION, labels=["lesion", "tool"])
    manifest.preprocessing.CopyFrom(
        manifest_pb2.Preprocessing(height=100, width=100, resize=manifest_pb2.RESIZE_MODE_LETTERBOX, scale=1.0)
    )
    manifest.postprocessing.output = "boxes"
    manifest.postprocessing.detection.CopyFrom(
        manifest_pb2.DetectionParams(
            scores_output="scores",
            activation=manifest_pb2.ACTIVATION_NONE,
            box_format=manifest_pb2.BOX_FORMAT_XYXY,
            score_threshold=0.3,
            iou_threshold=0.5,
            max_boxes=max_boxes,
        )
    )
    return manifest


BOXES = np.array([[[10, 10, 50, 50], [12, 12, 52, 52], [60, 60, 90, 90], [11, 11, 51, 51]]], np.float32)
# Box 1 overlaps box 0 but scores lower; box 3 overlaps box 0 but is another class.
SCORES = np.array([[[0.9, 0.0], [0.8, 0.1], [0.0, 0.6], [0.1, 0.7]]], np.float32)


def test_nms_keeps_the_best_of_overlapping_boxes_per_class() -> None:
    found = detect(BOXES, SCORES, _detection_manifest().postprocessing.detection)
    assert found.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert found.labels.tolist() == [0, 1, 1]
    np.testing.assert_array_equal(found.boxes[0], [10, 10, 50, 50])


def test_nms_and_iou_basics() -> None:
    a = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    assert box_iou(a[:1], a[1:2])[0, 0] == pytest.approx(50 / 150)
    assert nms(a, np.array([0.5, 0.9, 0.1], np.float32), 0.3).tolist() == [1, 2]
    assert nms(a, np.array([0.5, 0.9, 0.1], np.float32), 0.4).tolist() == [1, 0, 2]
    np.testing.assert_array_equal(
        to_xyxy(np.array([[10, 20, 4, 6]], np.float32), manifest_pb2.BOX_FORMAT_CXCYWH), [[8, 17, 12, 23]]
    )


def test_boxes_come_back_in_frame_pixels_through_the_letterbox() -> None:
    manifest = _detection_manifest(max_boxes=1)
    # A 200x400 frame letterboxed into 100x100: scaled by 1/4, 25 rows of bar above.
    _, geometry = preprocess(np.zeros((200, 400), np.uint8), manifest.preprocessing)
    assert (geometry.top, geometry.left, geometry.height, geometry.width) == (25, 0, 50, 100)
    result = postprocess({"boxes": BOXES, "scores": SCORES}, manifest, geometry, None)
    assert result.boxes is not None and len(result.boxes) == 1
    box = result.boxes[0]
    assert (box.x_min, box.y_min, box.x_max, box.y_max) == pytest.approx((40, 0, 200, 100))
    assert box.label == "lesion"


def test_ssim_and_psnr_track_image_damage() -> None:
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (64, 64)).astype(np.uint8), (5, 5), 1.0)
    assert ssim(image, image) == pytest.approx(1.0)
    assert psnr(image, image) == 100.0
    noisy = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    assert 25 < psnr(image, noisy) < 30  # sigma 10 noise: about 28 dB
    assert ssim(image, noisy) < 0.95
    assert ssim(image, noisy) > ssim(image, np.clip(image + rng.normal(0, 40, image.shape), 0, 255).astype(np.uint8))


def _manifest(task: int, **post: object) -> manifest_pb2.ModelManifest:
    manifest = manifest_pb2.ModelManifest(task=task)
    manifest.postprocessing.output = "out"
    for key, value in post.items():
        getattr(manifest.postprocessing, key).CopyFrom(value)
    return manifest


def _failed(metrics: list[manifest_pb2.MetricValue]) -> set[str]:
    return {m.name for m in metrics if not m.passed}


def test_classification_gate_fails_on_a_flipped_label() -> None:
    manifest = _manifest(
        manifest_pb2.TASK_CLASSIFICATION,
        classification=manifest_pb2.ClassificationParams(activation=manifest_pb2.ACTIVATION_SOFTMAX),
    )
    ref = [np.array([[2.0, 1.0, 0.0]], np.float32)]
    assert not _failed(compare(ref, [ref[0] + 1e-5], manifest, GateThresholds()))
    flipped = [np.array([[1.0, 2.0, 0.0]], np.float32)]
    assert _failed(compare(ref, flipped, manifest, GateThresholds())) >= {"top1_agreement", "max_probability_diff"}


def test_detection_gate_fails_on_a_moved_box() -> None:
    manifest = _detection_manifest()
    manifest.postprocessing.output = "boxes"
    reference = [{"boxes": BOXES, "scores": SCORES}]
    moved = BOXES.copy()
    moved[0, 2] += 5.0
    metrics = compare(reference, [{"boxes": moved, "scores": SCORES}], manifest, GateThresholds(max_abs_error=10.0))
    values = {m.name: m.value for m in metrics}
    assert _failed(metrics) == {"box_iou_mean"}
    assert values["box_match"] == 1.0 and values["box_iou_mean"] < 0.99


def test_image_gate_fails_on_noise_and_passes_with_looser_limits() -> None:
    manifest = _manifest(manifest_pb2.TASK_IMAGE, image=manifest_pb2.ImageParams(output_min=0.0, output_max=1.0))
    rng = np.random.default_rng(1)
    ref = [rng.random((1, 1, 32, 32)).astype(np.float32)]
    noisy = [np.clip(ref[0] + rng.normal(0, 0.05, ref[0].shape), 0, 1).astype(np.float32)]
    assert _failed(compare(ref, noisy, manifest, GateThresholds())) == {"error_vs_tolerance", "psnr_min_db", "ssim_min"}
    loose = GateThresholds(max_abs_error=1.0, min_psnr_db=20.0, min_ssim=0.5)
    assert not _failed(compare(ref, noisy, manifest, loose))


def test_anomaly_gate_fails_when_the_decision_flips() -> None:
    manifest = _manifest(manifest_pb2.TASK_ANOMALY, anomaly=manifest_pb2.AnomalyParams(score_threshold=0.5))
    ref = [np.full((1, 1, 8, 8), 0.49, np.float32)]
    cand = [np.full((1, 1, 8, 8), 0.51, np.float32)]
    assert _failed(compare(ref, cand, manifest, GateThresholds(max_abs_error=1.0))) == {
        "score_max_diff",
        "decision_agreement",
    }


def test_anomaly_heat_map_and_score_on_the_frame() -> None:
    manifest = _manifest(
        manifest_pb2.TASK_ANOMALY,
        anomaly=manifest_pb2.AnomalyParams(
            score_threshold=0.1, heatmap_normalization=manifest_pb2.HEATMAP_NORMALIZATION_FIXED, heatmap_max=1.0
        ),
    )
    manifest.preprocessing.CopyFrom(manifest_pb2.Preprocessing(height=8, width=8, scale=1.0))
    amap = np.zeros((1, 1, 8, 8), np.float32)
    amap[0, 0, :4, :4] = 1.0
    _, geometry = preprocess(np.zeros((16, 32), np.uint8), manifest.preprocessing)
    result = postprocess({"out": amap}, manifest, geometry, None)
    heat = result.images["heatmap"]
    assert heat.shape == (16, 32)
    assert heat[0, 0] == 255 and heat[-1, -1] == 0
    quantities = {q.name: q.value for q in result.quantities}
    assert quantities["anomaly_score"] == pytest.approx(0.25)
    assert quantities["anomalous"] == 1.0


def test_old_compare_call_with_arrays_still_works_for_segmentation() -> None:
    manifest = _manifest(
        manifest_pb2.TASK_SEGMENTATION,
        segmentation=manifest_pb2.SegmentationParams(activation=manifest_pb2.ACTIVATION_SIGMOID, threshold=0.5),
    )
    ref = [np.ones((1, 1, 4, 4), np.float32)]
    names = {m.name for m in compare(ref, [-ref[0]], manifest, GateThresholds(max_abs_error=1e-3, min_dice=0.99))}
    assert names == RAW_ERROR_METRICS | {"dice_min", "dice_mean", "iou_min"}
