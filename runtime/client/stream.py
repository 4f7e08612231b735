"""Stream a frame source to a server and collect results, latency and overlays.

The sender paces frames at the source's native rate (or as fast as the
server accepts them); the receiver checks that every frame gets exactly one
answer, in order, and records per-stage and end-to-end latency.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt

from edgescope.errors import EdgescopeError
from edgescope.runtime.client.clock import ClockEstimator, ClockSample
from edgescope.runtime.client.rate import RateWatch
from edgescope.runtime.client.shm import SharedMemorySender
from edgescope.runtime.client.sources_summary import SourcesSummary
from edgescope.runtime.client.video import VideoRecorder
from edgescope.runtime.pipeline.decode import encode_raw_into
from edgescope.runtime.render.overlay import load_fonts, render_result
from edgescope.runtime.sources.base import FrameSource, SourceFrame
from edgescope.runtime.sources.display import to_display_rgb8
from edgescope.runtime.sources.merged import MergedSources
from edgescope.runtime.telemetry.latency import LatencyRecorder, count_monitoring, drop_label, missed_deadline
from edgescope.runtime.transport import DEFAULT_MAX_MESSAGE_BYTES, ClientSecurity, aio_channel, channel_options
from edgescope.v1 import stream_pb2, stream_pb2_grpc

SOURCE_KINDS = {
    "ultrasound": stream_pb2.SOURCE_KIND_ULTRASOUND,
    "endoscopy": stream_pb2.SOURCE_KIND_ENDOSCOPY,
    "fluoroscopy": stream_pb2.SOURCE_KIND_FLUOROSCOPY,
    "microscope": stream_pb2.SOURCE_KIND_MICROSCOPE,
    "other": stream_pb2.SOURCE_KIND_OTHER,
}

ResultCallback = Callable[[SourceFrame, stream_pb2.Result], None]
# Text rows in an overlay video's band (model, timings, areas, or a status), the same on every frame.
OVERLAY_TEXT_ROWS = 3


class StreamError(EdgescopeError):
    """The server broke the stream's contract (a missing or out-of-order answer)."""


@dataclass(slots=True)
class StreamOptions:
    target: str
    model: str
    realtime: bool = True
    max_frames: int | None = None
    stream_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    save: Path | None = None
    mask_encoding: stream_pb2.MaskEncoding.ValueType = stream_pb2.MASK_ENCODING_PNG
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    timeout_s: float | None = None
    policy: stream_pb2.StreamPolicy.ValueType = stream_pb2.STREAM_POLICY_UNSPECIFIED
    deadline_ms: int = 0
    # At most this many frames awaiting answers; None leaves pacing to gRPC flow control.
    max_in_flight: int | None = None
    # Same host only: pixels go through a ring of shared-memory slots, not protobuf bytes.
    shared_memory: bool = False
    shared_memory_slots: int = 4
    # TLS, client certificate, token; plain text only to loopback by default.
    security: ClientSecurity = field(default_factory=ClientSecurity)
    # Several sources (a ``MergedSources``): how the server pairs their frames; None: its defaults.
    pairing: stream_pb2.PairingPolicy | None = None
    # Ask for each label's probabilities with the mask (a FRACTIONAL Segmentation is made of them).
    want_probabilities: bool = False


@dataclass(slots=True)
class StreamReport:
    sent: int
    latency: LatencyRecorder
    video: Path | None
    clock: ClockEstimator = field(default_factory=ClockEstimator)
    # Said when the achieved rate stayed under 90% of the source's (paced streams only).
    rate_warnings: list[str] = field(default_factory=list)
    # Why the stream stopped before its source ended (a lost camera, the server gone); empty if it did not.
    error: str = ""
    # Several sources: per-source counts and pairing (``SourcesSummary``); None for one source.
    sources: SourcesSummary | None = None


def build_frame(
    source_frame: SourceFrame,
    seq: int,
    options: StreamOptions,
    kind: str,
    *,
    with_pixels: bool = True,
    capture_time_ns: int | None = None,
) -> stream_pb2.Frame:
    frame = stream_pb2.Frame(
        stream_id=options.stream_id,
        seq=seq,
        capture_time_ns=capture_time_ns or time.time_ns(),
        model=options.model,
        source_kind=SOURCE_KINDS[kind],
        mask_encoding=options.mask_encoding,
        policy=options.policy,
        deadline_ms=options.deadline_ms,
        want_probabilities=options.want_probabilities,
    )
    if with_pixels and source_frame.signal is None:
        encode_raw_into(frame.raw, source_frame.pixels)
    source_frame.describe(frame)
    if seq == 0 and options.pairing is not None:
        frame.pairing.CopyFrom(options.pairing)
    return frame


def _overlay_lines(result: stream_pb2.Result, e2e_ms: float) -> list[str]:
    if result.status.code != stream_pb2.FRAME_STATUS_CODE_OK:
        return [f"seq {result.seq}: {stream_pb2.FrameStatusCode.Name(result.status.code)} {result.status.reason}"[:90]]
    timings = {t.stage: t.duration_ns / 1e6 for t in result.timings}
    lines = [f"{result.provenance.model} {result.provenance.version} [{result.provenance.backend}] seq {result.seq}"]
    lines.append(f"end-to-end {e2e_ms:.1f} ms  infer {timings.get('infer', 0.0):.1f} ms")
    areas = [_area_text(q) for q in result.quantities if q.name.endswith("_area")]
    lines.append("  ".join(areas) if areas else "")
    return lines


def _area_text(quantity: stream_pb2.Quantity) -> str:
    if quantity.unit == "px":
        return f"{quantity.name}: {quantity.value:.0f} px (no calibration)"
    where = f" in {quantity.region}" if quantity.region else ""
    outside = f", {quantity.fraction_outside:.0%} of mask outside" if quantity.pixels_outside else ""
    return f"{quantity.name}: {quantity.value:.1f} mm^2{where}{outside}"


def _overlay(source_frame: SourceFrame, result: stream_pb2.Result, e2e_ms: float) -> npt.NDArray[np.uint8]:
    shown = to_display_rgb8(source_frame.pixels, source_frame.pixel_transform)
    return render_result(shown, result, _overlay_lines(result, e2e_ms), rows=OVERLAY_TEXT_ROWS)


async def stream_source(
    source: FrameSource, options: StreamOptions, on_result: ResultCallback | None = None
) -> StreamReport:
    """Stream ``source`` through the server's Stream call and summarise the run."""
    latency = LatencyRecorder()
    clock = ClockEstimator()
    in_flight: dict[int, SourceFrame] = {}
    sent = 0
    frames_iter: Iterator[SourceFrame] = iter(source)
    sender: SharedMemorySender | None = None
    window = asyncio.Semaphore(options.max_in_flight) if options.max_in_flight else None
    # Set when the server says it is shutting down: frames sent after that would only be dropped.
    server_stopping = asyncio.Event()
    # Several sources: each frame stamped with its source's own timestamp from the stream's start (the
    # sources' clock), not the moment it is sent, so a sender that falls behind does not move a frame
    # away from its partners.
    merged = source if isinstance(source, MergedSources) else None
    sources = SourcesSummary(merged.names, "source") if merged else None
    lead = merged.names[0] if merged is not None else ""

    error = ""

    async def frames() -> AsyncIterator[stream_pb2.Frame]:
        nonlocal sent, error
        start = time.monotonic()
        start_wall_ns = time.time_ns()
        while (options.max_frames is None or sent < options.max_frames) and not server_stopping.is_set():
            # Decoding a source frame (JPEG, video) blocks; keep it off the loop.
            try:
                source_frame = await asyncio.to_thread(next, frames_iter, None)
            except EdgescopeError as exc:
                # The source is lost: stop sending, collect the answers to what was sent, and say why.
                error = f"the source stopped: {exc}"
                return
            if source_frame is None:
                return
            if options.realtime:
                delay = start + source_frame.timestamp_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if window is not None:
                await window.acquire()
            in_flight[sent] = source_frame
            stamp = None if merged is None else start_wall_ns + int(source_frame.timestamp_s * 1e9)
            frame = build_frame(
                source_frame, sent, options, source.kind, with_pixels=sender is None, capture_time_ns=stamp
            )
            if sources is not None:
                sources.sent(frame)
            if sender is not None and source_frame.signal is None:
                await sender.place(frame, source_frame.pixels)
            yield frame
            sent += 1

    rate = RateWatch(source.fps) if options.realtime else None
    video_fps = merged.fps_of(lead) if merged is not None else source.fps
    recorder = VideoRecorder(options.save, video_fps) if options.save is not None else None
    if recorder is not None:
        load_fonts()  # before the first overlay, which would otherwise pay for them mid-stream
    # Overlays are drawn and encoded on a worker thread, fed through a short
    # queue, so the receive loop timestamps each answer as soon as it arrives.
    to_render: asyncio.Queue[tuple[SourceFrame, stream_pb2.Result, float] | None] = asyncio.Queue(maxsize=32)

    async def render() -> None:
        while (item := await to_render.get()) is not None:
            if recorder is not None:
                source_frame, result, e2e_ms = item
                await asyncio.to_thread(recorder.write, _overlay(source_frame, result, e2e_ms))

    renderer = asyncio.create_task(render())
    expected = 0
    try:
        async with aio_channel(options.target, options.security, channel_options(options.max_message_bytes)) as channel:
            stub = stream_pb2_grpc.StreamServiceStub(channel)
            if options.shared_memory:
                sender = SharedMemorySender(stub, options.stream_id, options.shared_memory_slots)
            call = stub.Stream(frames(), timeout=options.timeout_s)
            try:
                async for result in call:
                    received_ns = time.time_ns()
                    if result.seq != expected:
                        raise StreamError(f"expected the answer to frame {expected}, got {result.seq}")
                    expected += 1
                    source_frame = in_flight.pop(result.seq)
                    if window is not None:
                        window.release()
                    if sender is not None:
                        sender.answered(result.seq)
                    if result.status.drop_reason == stream_pb2.DROP_REASON_SHUTDOWN:
                        server_stopping.set()
                    e2e_ns = received_ns - result.capture_time_ns
                    _record(latency, clock, result, received_ns)
                    if rate is not None:
                        rate.answered(time.monotonic())
                    if sources is not None:
                        sources.answered(source_frame.source, result)
                    # The video shows the leading source's frames, with the result of each set.
                    if recorder is not None and source_frame.source == lead:
                        await to_render.put((source_frame, result, e2e_ns / 1e6))
                    if on_result is not None:
                        on_result(source_frame, result)
            except grpc.aio.AioRpcError as exc:
                # The stream ended non-OK (the server stopping, a broken message): keep what was answered.
                error = f"the server ended the stream: {exc.code().name}: {exc.details()}"
            if sender is not None and not error:
                await sender.unregister()
        await to_render.put(None)
        await renderer
    finally:
        renderer.cancel()
        if recorder is not None:
            recorder.close()
        if sender is not None:
            sender.unlink()
    if expected != sent and not error:
        raise StreamError(f"sent {sent} frames but received {expected} answers")
    warnings = rate.warnings if rate is not None else []
    return StreamReport(
        sent=sent,
        latency=latency,
        video=options.save,
        clock=clock,
        rate_warnings=warnings,
        error=error,
        sources=sources,
    )


def _record(latency: LatencyRecorder, clock: ClockEstimator, result: stream_pb2.Result, received_ns: int) -> None:
    # Capture stamp and receive time are both on this host's clock: end to end needs no sync.
    e2e_ns = received_ns - result.capture_time_ns
    sample = ClockSample(result.capture_time_ns, result.server_receive_time_ns, result.server_send_time_ns, received_ns)
    clock.add(sample)
    measured = latency.count_result(time.monotonic())
    code = result.status.code
    if missed_deadline(result.status):
        latency.deadline_misses += 1
    count_monitoring(latency, result)
    if code == stream_pb2.FRAME_STATUS_CODE_DROPPED:
        latency.count_drop(drop_label(result.status))
        return
    if code == stream_pb2.FRAME_STATUS_CODE_PAIRED:
        # Its set's result, and that result's latency, are on the leading frame.
        return
    if code != stream_pb2.FRAME_STATUS_CODE_OK:
        latency.errors += 1
        return
    if not measured:
        return
    split = clock.split(sample) if sample.t1 > 0 else None
    if split is not None:
        latency.add("uplink", split[0])
        latency.add("downlink", split[1])
    server_ns = 0
    for timing in result.timings:
        latency.add(timing.stage, timing.duration_ns)
        server_ns += timing.duration_ns
    latency.add("server_total", server_ns)
    latency.add("transport", max(0, e2e_ns - server_ns))
    latency.add("end_to_end", e2e_ns)
