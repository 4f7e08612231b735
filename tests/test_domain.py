"""Every frame checked against what the model was validated on: the profile, the score, what the server says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from prometheus_client import generate_latest
from pydicom.data import get_testdata_file

from edgescope.bundle import MANIFEST_FILE, Bundle
from edgescope.errors import BundleError
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.pipeline.domain import fit_profile
from edgescope.runtime.server.repository import BundlePolicy
from edgescope.runtime.sources import open_source
from edgescope.signing import generate_key, load_private_key, load_public_keys, sign_bundle
from edgescope.v1 import stream_pb2, stream_pb2_grpc

from .conftest import ServerThread

OUT_OF_DOMAIN = stream_pb2.Alert.KIND_OUT_OF_DOMAIN


def test_the_threshold_is_set_on_frames_kept_out_of_the_fit() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(300, 5))
    profile = fit_profile(reference, [f"f{i}" for i in range(5)], "numbers", false_alarm_rate=0.01)
    assert (profile.fit_frames, profile.held_out_frames) == (200, 100)
    # Five standard normal features: the distance's 99th percentile is about sqrt(15.1) = 3.9.
    assert 3.3 < profile.threshold < 4.6
    assert profile.held_out_above <= 0.03


def _frames(example_bundle: Bundle) -> dict[str, list[np.ndarray]]:
    """Frames like the profile's (the synthetic ultrasound the example was exported on, frames after those it
    was fitted on), and not (an X-ray, an inverted frame)."""
    with open_source(example_bundle.manifest.domain.data_source) as source:
        frames = iter(source)
        reference = example_bundle.manifest.domain.fit_frames + example_bundle.manifest.domain.held_out_frames
        like = [next(frames).pixels for _ in range(reference + 6)][reference:]
    with open_source(f"dicom:{get_testdata_file('RG1_UNCR.dcm')}") as source:
        xray = next(iter(source)).pixels
    xray = cv2.normalize(xray, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    size = (like[0].shape[1], like[0].shape[0])
    return {"like": like, "unlike": [cv2.resize(xray, size), (255 - like[0]).astype(np.uint8)]}


def test_the_server_says_on_every_result_whether_the_frame_is_in_domain(
    server: ServerThread, example_bundle: Bundle
) -> None:
    assert example_bundle.manifest.HasField("domain"), "the example's export fits a profile by default"
    frames = _frames(example_bundle)
    with grpc.insecure_channel(server.target) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)

        def answer(pixels: np.ndarray) -> stream_pb2.Result:
            return stub.Infer(stream_pb2.Frame(stream_id="domain", raw=encode_raw(pixels)), timeout=30)

        like = [answer(pixels) for pixels in frames["like"]]
        unlike = [answer(pixels) for pixels in frames["unlike"]]
        metrics = generate_latest(server.running.telemetry.metrics.registry).decode()
    for result in like:
        assert result.domain.checked and result.domain.in_domain, (result.domain.score, result.domain.threshold)
        assert OUT_OF_DOMAIN not in [a.kind for a in result.alerts]
    for result in unlike:
        assert result.domain.checked and not result.domain.in_domain
        assert result.domain.score > result.domain.threshold and result.domain.furthest
        (alert,) = [a for a in result.alerts if a.kind == OUT_OF_DOMAIN]
        assert alert.model == "lesion-unet" and alert.value == pytest.approx(result.domain.score)
    assert 'edgescope_out_of_domain_total{model="lesion-unet"} 2.0' in metrics
    assert "domain" in [t.stage for t in like[0].timings]


def test_a_bundle_without_a_profile_serves_and_says_nothing_was_checked(example_bundle: Bundle, tmp_path: Path) -> None:
    bundle = tmp_path / "no-profile"
    shutil.copytree(example_bundle.path, bundle)
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    del manifest["domain"]
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    served = ServerThread([bundle])
    try:
        with grpc.insecure_channel(served.target) as channel:
            pixels = _frames(example_bundle)["unlike"][0]
            result = stream_pb2_grpc.StreamServiceStub(channel).Infer(
                stream_pb2.Frame(stream_id="n", raw=encode_raw(pixels)), timeout=30
            )
    finally:
        served.stop()
    assert result.status.code == stream_pb2.FRAME_STATUS_CODE_OK and not result.domain.checked


def test_a_profile_altered_after_signing_is_refused_like_any_altered_file(
    example_bundle: Bundle, tmp_path: Path
) -> None:
    bundle = tmp_path / "signed"
    shutil.copytree(example_bundle.path, bundle)
    public = generate_key(tmp_path / "release.key")
    sign_bundle(bundle, load_private_key(tmp_path / "release.key"))
    policy = BundlePolicy(trusted_keys=tuple(load_public_keys(public)))
    policy.open(bundle)
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["domain"]["threshold"] = 1e9  # nothing would ever be out of domain
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError):
        policy.open(bundle)
