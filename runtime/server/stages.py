"""One frame's work for each model it goes to, done where the frame is inferred.

A ``FrameJob`` is one model's part of one frame. Its ``prepare`` (decode,
once per frame whichever model needs the pixels first, then this model's
preprocessing) and its ``finish`` (postprocess, encode, the Result with its
stage timings) run on the model's instance thread, right before and right
after the inference, so a frame crosses threads once into the model's worker
and once out (``job_for``). Streams and ``Infer`` both go through these, so a
frame gets the same answer either way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from edgescope.errors import FrameError
from edgescope.runtime.pipeline.decode import DEFAULT_LIMITS, FrameLimits, Pixels, SharedMemoryView, decode_frame
from edgescope.runtime.pipeline.domain import DomainScorer, normal_score
from edgescope.runtime.pipeline.encode import fill_result
from edgescope.runtime.pipeline.postprocess import postprocess
from edgescope.runtime.pipeline.preprocess import Geometry, preprocess
from edgescope.runtime.pipeline.signal import signal_tensor
from edgescope.runtime.pipeline.state import StreamState, frame_input, frame_source, is_stateful, source_inputs
from edgescope.runtime.pipeline.tta import FLIP, flip_batch, merge_flip
from edgescope.runtime.render.preview import preview_jpeg, thumbnail
from edgescope.runtime.server.registry import WITHHOLD, ModelPolicy, ServedModel
from edgescope.runtime.server.workers import Job, JobResult
from edgescope.v1 import stream_pb2


class FramePixels:
    """One frame's pixels, decoded (within ``limits``) once, by the first thread that needs them."""

    def __init__(
        self,
        frame: stream_pb2.Frame,
        shared_memory: SharedMemoryView | None = None,
        limits: FrameLimits = DEFAULT_LIMITS,
    ) -> None:
        self._frame = frame
        self._limits = limits
        self._lock = threading.Lock()
        self._pixels: Pixels | None = None
        self.decode_ns = 0
        # A shared-memory slot is looked up now, on the call that sent the frame: only its registrant may read it.
        self._shared: memoryview | None = None
        self._source = shared_memory
        if shared_memory is not None and frame.WhichOneof("pixels") == "shm":
            self._shared = shared_memory(frame.shm)
            self._source = self._bound

    def _bound(self, _reference: stream_pb2.SharedMemoryFrame) -> memoryview:
        if self._shared is None:
            raise RuntimeError("no shared-memory slot was bound for this frame")
        return self._shared

    @property
    def frame(self) -> stream_pb2.Frame:
        return self._frame

    def get(self) -> Pixels:
        with self._lock:
            if self._pixels is None:
                start = time.perf_counter_ns()
                self._pixels = decode_frame(self._frame, self._source, self._limits)
                self.decode_ns = time.perf_counter_ns() - start
            return self._pixels


@dataclass(slots=True)
class Finished:
    result: stream_pb2.Result
    # The preview JPEG for telemetry, when the frame's thumbnail was asked for.
    preview: bytes | None = None


@dataclass(slots=True, eq=False)
class FrameJob:
    """One model's part of one frame; ``primary``: its result is the frame's answer (see ``answer``)."""

    model: ServedModel
    frame: stream_pb2.Frame
    pixels: FramePixels
    # When the frame was read (perf_counter ns): its queue time runs from there to ``prepare``.
    received_ns: int
    primary: bool = True
    want_thumbnail: bool = False
    geometry: Geometry | None = None
    queue_ns: int = 0
    preprocess_ns: int = 0
    thumb: npt.NDArray[np.uint8] | None = field(default=None, repr=False)
    tensor: npt.NDArray[np.float32] | None = field(default=None, repr=False)
    # A model fed by several sources: the frames paired with this one, by source, and their inputs
    # (filled in by ``prepare``; the worker's job holds the same dict).
    partners: Mapping[str, FramePixels] = field(default_factory=dict)
    side: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict, repr=False)

    def prepare(self) -> npt.NDArray[np.float32]:
        start = time.perf_counter_ns()
        self.queue_ns = start - self.received_ns
        pixels = self.pixels.get()
        begin = time.perf_counter_ns()
        # DICOM frames carry how stored values become display values (modality LUT, window, MONOCHROME1).
        transform = self.frame.pixel_transform if self.frame.HasField("pixel_transform") else None
        tensor, self.geometry = preprocess(pixels, self.model.manifest.preprocessing, transform)
        self.tensor = tensor
        for binding in source_inputs(self.model.manifest):
            partner = self.partners.get(binding.source)
            if partner is None:
                raise FrameError(
                    f"model {self.model.name} takes a frame of source {binding.source!r} with each frame of "
                    f"source {frame_source(self.model.manifest)!r}; none came with this one (send both on one stream)"
                )
            if binding.HasField("signal"):
                self.side[binding.input] = signal_tensor(partner.frame.signal, binding.signal, binding.source)
                continue
            own = partner.frame.pixel_transform if partner.frame.HasField("pixel_transform") else None
            self.side[binding.input] = preprocess(partner.get(), binding.preprocessing, own)[0]
        if self.model.policy.tta == FLIP:
            # The frame and its mirror image, one inference (the domain check scores the frame's own input).
            tensor = flip_batch(tensor, self.model.manifest.preprocessing.layout)
        self.preprocess_ns = time.perf_counter_ns() - begin
        if self.want_thumbnail:
            self.thumb = thumbnail(pixels, transform)
        return tensor

    def finish(self, inferred: JobResult) -> Finished:
        """Postprocess and encode the outputs into this model's Result, which carries its stage timings."""
        if self.geometry is None:
            raise RuntimeError("a frame was finished before it was prepared")
        frame, model = self.frame, self.model
        result = stream_pb2.Result(stream_id=frame.stream_id, seq=frame.seq, capture_time_ns=frame.capture_time_ns)
        if self.primary:
            result.timings.add(stage="queue", duration_ns=self.queue_ns)
            result.timings.add(stage="decode", duration_ns=self.pixels.decode_ns)
        result.timings.add(stage="preprocess", duration_ns=self.preprocess_ns)
        result.timings.add(stage="infer", duration_ns=inferred.infer_ns)
        start = time.perf_counter_ns()
        if model.policy.tta == FLIP:
            inferred = replace(inferred, outputs=merge_flip(inferred.outputs, model.manifest))
        task = postprocess(
            inferred.outputs, model.manifest, self.geometry, _spacing(frame), frame.regions, frame.want_probabilities
        )
        encoded = time.perf_counter_ns()
        result.timings.add(stage="postprocess", duration_ns=encoded - start)
        fill_result(result, task, frame.mask_encoding)
        result.provenance.CopyFrom(inferred.provenance)
        result.status.code = stream_pb2.FRAME_STATUS_CODE_OK
        checked = time.perf_counter_ns()
        result.timings.add(stage="encode", duration_ns=checked - encoded)
        if model.domain is not None and self.tensor is not None:
            _check_domain_result(result, model.domain, self.tensor, inferred)
            result.timings.add(stage="domain", duration_ns=time.perf_counter_ns() - checked)
        if model.policy.out_of_domain == WITHHOLD:
            withhold_if_unsure(result, model.policy)
        preview = None
        if self.thumb is not None:
            preview = preview_jpeg(self.thumb, task.mask, [f"{frame.stream_id} seq {frame.seq} {model.name}"])
        return Finished(result, preview)


def _check_domain_result(
    result: stream_pb2.Result, scorer: DomainScorer, tensor: npt.NDArray[np.float32], inferred: JobResult
) -> None:
    """Score the frame against the model's domain profile; one out of it carries an in-band alert."""
    score, furthest = scorer.score(tensor, inferred.outputs)
    threshold = scorer.profile.threshold
    domain = result.domain
    domain.checked, domain.score, domain.threshold = True, score, threshold
    domain.in_domain = score <= threshold
    domain.furthest.extend(furthest)
    # The stream's drift test adds these up where answers leave, in order (``drift.StreamDrift``).
    domain.normal_score = normal_score(score, scorer.profile)
    domain.drift_threshold = scorer.drift_threshold
    if not domain.in_domain:
        result.alerts.add(
            kind=stream_pb2.Alert.KIND_OUT_OF_DOMAIN,
            model=result.provenance.model,
            value=score,
            threshold=threshold,
            message=f"the frame does not look like what the model was validated on (furthest: {', '.join(furthest)})",
        )


def withhold_if_unsure(result: stream_pb2.Result, policy: ModelPolicy) -> None:
    """A model whose policy is withhold: an out-of-domain frame or an unsure answer loses its quantities,
    and the result says why (its mask and alerts stay, for a person to see)."""
    reasons = []
    if result.domain.checked and not result.domain.in_domain:
        reasons.append(f"out of domain (score {result.domain.score:.2f} > {result.domain.threshold:.2f})")
    if result.HasField("confidence") and result.confidence < policy.min_confidence:
        reasons.append(f"confidence {result.confidence:.3f} < {policy.min_confidence:g}")
    if reasons:
        del result.quantities[:]
        result.withheld = "quantities withheld: " + "; ".join(reasons)


def frame_jobs(
    frame: stream_pb2.Frame,
    models: list[ServedModel],
    pixels: FramePixels,
    received_ns: int,
    want_thumbnail: bool,
    partners: Mapping[str, FramePixels] | None = None,
) -> list[FrameJob]:
    """The frame's part for each model: the first model's result is its answer, the others' ride along."""
    return [
        FrameJob(
            model,
            frame,
            pixels,
            received_ns,
            primary=index == 0,
            want_thumbnail=want_thumbnail and index == 0,
            partners=partners or {},
        )
        for index, model in enumerate(models)
    ]


def job_for(
    frame_job: FrameJob,
    lane: str,
    stream: StreamState,
    reset: bool,
    deadline_ns: int | None = None,
    live: bool = False,
    opening: bool = False,
) -> Job[Finished]:
    """The worker job for one model on one frame, carrying the stream's state if the model has any,
    and the frame's deadline (perf_counter ns), past which the worker does not run it; ``live`` for a
    frame of a stream or capture, ``opening`` for its first."""
    model = frame_job.model
    manifest = model.manifest
    state = stream.for_model(model.name, manifest) if is_stateful(manifest) else None
    return Job(
        lane=lane,
        finish=frame_job.finish,
        prepare=frame_job.prepare,
        frame_input=frame_input(manifest),
        side_inputs=frame_job.side,
        state=state,
        reset_state=reset,
        # A stream's first frame runs alone: a burst of new streams would otherwise come in batches
        # that a running stream's frame waits for (on a CPU a batch of n costs about n frames).
        batchable=state is None and model.batchable and not opening,
        rows=2 if model.policy.tta == FLIP else 1,
        deadline_ns=deadline_ns,
        live=live,
        opening=opening,
    )


def answer(jobs: list[FrameJob], finished: list[Finished]) -> Finished:
    """The frame's answer: the first model's result, the others' in ``model_results``."""
    first = finished[0]
    for frame_job, extra in zip(jobs[1:], finished[1:], strict=True):
        first.result.model_results.append(as_model_result(frame_job.model.name, extra.result))
    return first


def _spacing(frame: stream_pb2.Frame) -> stream_pb2.PixelSpacing | None:
    if frame.HasField("spacing") and frame.spacing.row_mm > 0 and frame.spacing.column_mm > 0:
        return frame.spacing
    return None


def as_model_result(model: str, result: stream_pb2.Result) -> stream_pb2.ModelResult:
    return stream_pb2.ModelResult(
        model=model,
        status=result.status,
        outputs=result.outputs,
        quantities=result.quantities,
        timings=result.timings,
        provenance=result.provenance,
    )
