"""The bundle's domain profile: what the frames it was validated on look like, to check every frame against.

Fitted at export by the runtime's own evaluator (``runtime.pipeline.domain``)
on ``reference_samples`` frames of the gate's source, run through the graph
the bundle serves, and kept in the manifest (so its hashes and signature
cover it). Models with recurrent state or several inputs get none yet.
"""

from __future__ import annotations

import numpy as np

from edgescope.export.gate import representative_inputs
from edgescope.runtime.evaluation.runners import Infer, run_stream
from edgescope.runtime.pipeline.domain import feature_names, fit_profile, frame_features
from edgescope.runtime.pipeline.state import frame_input, is_stateful
from edgescope.v1 import manifest_pb2


def profiled(manifest: manifest_pb2.ModelManifest) -> bool:
    """Whether a domain profile is made for this model (one input, no recurrent state)."""
    return len(manifest.inputs) == 1 and not is_stateful(manifest)


def domain_profile(
    infer: Infer, manifest: manifest_pb2.ModelManifest, data: str, samples: int, false_alarm_rate: float
) -> manifest_pb2.DomainProfile:
    """The profile of ``samples`` frames of ``data`` as the served graph (``infer``) sees and answers them."""
    frames = representative_inputs(data, samples, manifest.preprocessing)
    feeds, outputs = run_stream(infer, manifest, frames)
    name = frame_input(manifest)
    features = np.stack(
        [frame_features(feed[name], answer, manifest) for feed, answer in zip(feeds, outputs, strict=True)]  # type: ignore[arg-type]
    )
    return fit_profile(features, feature_names(manifest), data, false_alarm_rate)
