"""How well the per-frame domain check tells frames like the reference from frames that are not.

The example model is exported with its domain profile fitted on the first
80 frames of the real echo cine (pydicom-data); the check is then run, as the
server runs it (the model's input tensor and outputs, ``DomainScorer``), on:

- in domain: the cine's remaining 40 frames (false alarms);
- other recordings of the same kind: pydicom's ultrasound frames (false alarms
  in the same sense, though a different scanner is a real shift too);
- shifts applied to those 40 frames: gain x0.3 and x3, gamma 0.5 and 2, blur,
  speckle and Gaussian noise, a 40 % occlusion, inverted intensities, red and
  blue swapped, and an X-ray (pydicom-data's RG1) in place of the frame;
- a frozen frame (the same frame repeated), which a per-frame check cannot
  see: it is in the table to say so.

For each: the share of frames flagged out of domain, and the first flagged
frame. Also the per-frame cost of the check (p50, p99).

The stream's drift test (``runtime.pipeline.drift``, at the server's default
threshold, 24 h at 30 fps) is run on the in-domain frames followed by each
shift: the frames from the shift's start until the DRIFT alert (milder
shifts, gain x1.5 and x0.7 and noise of sigma 8, are in the table for it),
and false drift alerts over the in-domain frames, played forwards and
backwards 50 times (4,000 frames, the same 40 frames: correlated as video
is, but no new content). Prints a table and writes
``benchmarks/results/domain_check.json``.
Run: ``.venv/bin/python benchmarks/domain_check.py``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
from pydicom.data import get_testdata_file

from edgescope.export import ExportRequest, export_model
from edgescope.runtime.pipeline.domain import DomainScorer, normal_score
from edgescope.runtime.pipeline.drift import DEFAULT_FALSE_ALARM_HOURS, DriftTest
from edgescope.runtime.pipeline.preprocess import preprocess
from edgescope.runtime.sources import open_source

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CINE = get_testdata_file("color3d_jpeg_baseline.dcm")
FIT_FRAMES = 80
Image = np.ndarray[Any, Any]


def frames_of(spec: str, limit: int = 200) -> list[Image]:
    with open_source(spec) as source:
        frames = []
        for frame in source:
            pixels = frame.pixels
            if frame.pixel_transform is not None:
                pixels = cv2.normalize(pixels, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
            frames.append(pixels if pixels.ndim == 3 else cv2.cvtColor(pixels.astype(np.uint8), cv2.COLOR_GRAY2RGB))
            if len(frames) == limit:
                break
    return frames


def shifts(xray: Image) -> dict[str, Callable[[Image], Image]]:
    rng = np.random.default_rng(0)

    def clip(values: Image) -> Image:
        return np.clip(values, 0, 255).astype(np.uint8)

    def occluded(frame: Image) -> Image:
        out = frame.copy()
        height, width = frame.shape[:2]
        out[: int(height * 0.63), : int(width * 0.63)] = 0
        return out

    def xray_instead(frame: Image) -> Image:
        return cv2.resize(xray, (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_AREA)

    return {
        "gain x1.5 (mild)": lambda f: clip(f.astype(np.float32) * 1.5),
        "gain x0.7 (mild)": lambda f: clip(f * 0.7),
        "Gaussian noise (sigma 8, mild)": lambda f: clip(f + rng.normal(0, 8, f.shape)),
        "gain x0.3": lambda f: clip(f * 0.3),
        "gain x3": lambda f: clip(f.astype(np.float32) * 3),
        "gamma 0.5": lambda f: clip(255 * (f / 255.0) ** 0.5),
        "gamma 2": lambda f: clip(255 * (f / 255.0) ** 2),
        "blur (Gaussian, sigma 4)": lambda f: cv2.GaussianBlur(f, (0, 0), 4),
        "speckle (x gamma noise, var 0.3)": lambda f: clip(f * rng.gamma(1 / 0.3, 0.3, f.shape)),
        "Gaussian noise (sigma 25)": lambda f: clip(f + rng.normal(0, 25, f.shape)),
        "occlusion (40 %)": occluded,
        "inverted": lambda f: (255 - f).astype(np.uint8),
        "red and blue swapped": lambda f: np.ascontiguousarray(f[:, :, ::-1]),
        "an X-ray instead (RG1)": xray_instead,
    }


def main() -> int:
    cine = frames_of(f"dicom:{CINE}")
    held_out = cine[FIT_FRAMES:]
    other = frames_of(f"dicom:{get_testdata_file('US1_UNCR.dcm')}") + frames_of(
        f"dicom:{get_testdata_file('gdcm-US-ALOKA-16.dcm')}"
    )
    xray = frames_of(f"dicom:{get_testdata_file('RG1_UNCR.dcm')}", limit=1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_model(
            ExportRequest(
                name="lesion-unet",
                output=Path(tmp) / "lesion-unet",
                factory=str(ROOT / "examples" / "ultrasound_unet" / "model.py") + ":build",
                weights=ROOT / "examples" / "ultrasound_unet" / "weights.pt",
                data=f"dicom:{CINE}",
                samples=16,
                reference_samples=FIT_FRAMES,
            ),
            log=lambda _line: None,
        )
        manifest = bundle.manifest
        # As the server runs it: no threads busy-waiting after a run, taking the cores the check runs on.
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(bundle.path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    scorer = DomainScorer(manifest)
    name, outputs_names = manifest.inputs[0].name, [o.name for o in manifest.outputs]
    costs: list[float] = []

    def scores(frames: list[Image]) -> list[float]:
        out = []
        for frame in frames:
            tensor, _ = preprocess(frame, manifest.preprocessing)
            outputs = dict(zip(outputs_names, session.run(None, {name: tensor}), strict=True))
            started = time.perf_counter()
            score, _ = scorer.score(tensor, outputs)
            costs.append((time.perf_counter() - started) * 1e3)
            out.append(score)
        return out

    def drift_alerts(frame_scores: list[float]) -> list[int]:
        """The frames (indices) whose result would carry a DRIFT alert, as one stream."""
        test = DriftTest()
        normal = [normal_score(score, manifest.domain) for score in frame_scores]
        return [i for i, z in enumerate(normal) if test.update(z, scorer.drift_threshold)]

    in_domain = scores(held_out)

    def row(frames: list[Image], shifted: bool = False) -> dict[str, Any]:
        frame_scores = scores(frames)
        marks = [score > manifest.domain.threshold for score in frame_scores]
        out: dict[str, Any] = {
            "frames": len(marks),
            "flagged_share": round(float(np.mean(marks)), 3),
            "first_flagged": next((i for i, m in enumerate(marks) if m), None),
        }
        if shifted:
            # The in-domain frames first, then the shift: how many shifted frames until the alert.
            alerts = [i - len(in_domain) for i in drift_alerts(in_domain + frame_scores) if i >= len(in_domain)]
            out["frames_to_drift_alert"] = alerts[0] + 1 if alerts else None
        return out

    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, CPU only",
        "profile": {
            "fit_frames": manifest.domain.fit_frames,
            "held_out_frames": manifest.domain.held_out_frames,
            "threshold": round(manifest.domain.threshold, 3),
            "false_alarm_rate": manifest.domain.false_alarm_rate,
            "features": list(manifest.domain.features),
        },
        "in domain: the cine's other 40 frames": row(held_out),
        "other ultrasound recordings (US1_UNCR, gdcm-US-ALOKA-16)": row(other),
    }
    for label, shift in shifts(xray).items():
        report[label] = row([shift(frame) for frame in held_out], shifted=True)
    report["frozen frame (one frame, 40 times)"] = row([held_out[0]] * len(held_out), shifted=True)
    played = (in_domain + in_domain[::-1]) * 50
    report["drift"] = {
        "threshold": round(scorer.drift_threshold, 3),
        "false_alarm_hours": DEFAULT_FALSE_ALARM_HOURS,
        "in_domain_frames": len(played),
        "false_drift_alerts": len(drift_alerts(played)),
        "in_domain_normal_score_mean": round(float(np.mean([normal_score(s, manifest.domain) for s in in_domain])), 3),
    }
    report["cost_ms"] = {
        "p50": round(float(np.percentile(costs, 50)), 3),
        "p99": round(float(np.percentile(costs, 99)), 3),
    }
    print(f"{'frames':58} {'flagged':>8} {'first':>6} {'drift':>6}")
    for key, value in report.items():
        if isinstance(value, dict) and "flagged_share" in value:
            drift = value.get("frames_to_drift_alert", "")
            print(f"{key:58} {value['flagged_share']:8.3f} {value['first_flagged']!s:>6} {drift!s:>6}")
    print(f"drift test: {report['drift']}")
    print(f"per-frame cost of the check: {report['cost_ms']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "domain_check.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
