"""``edgescope stream``: a source to a server, with a latency summary and optionally results to an archive."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edgescope.commands.options import DEFAULT_TARGET, add_client_security, add_outbox, client_security
from edgescope.errors import ConfigError
from edgescope.runtime.archive.key_frames import DEFAULT_MAX_FRAMES, DEFAULT_POLICY

if TYPE_CHECKING:
    from edgescope.runtime.archive.audit import AuditTrail
    from edgescope.runtime.archive.recorders import CineRecorder, KeyFrameRecorder
    from edgescope.runtime.sources.base import SourceKind

    Recorder = CineRecorder | KeyFrameRecorder

_MODES = ("wait", "newest", "drop")


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("stream", help="stream a source to a server and summarise latency")
    p.add_argument(
        "--source",
        required=True,
        action="append",
        metavar="[NAME=]SPEC",
        help="dicom:PATH[?voi=..] | video:PATH | images:GLOB[?fps=F] | v4l2:/dev/videoN[?width=&height=&fps=&fourcc=] "
        "| rtsp:// rtsps:// http(s):// udp:// srt:// URL | gst:PIPELINE | synthetic:ultrasound | synthetic:endoscopy "
        "| synthetic:fluorescence | synthetic:ecg; repeat as NAME=SPEC for a model fed by several sources (the "
        "names its manifest gives them, e.g. --source white=synthetic:endoscopy --source nir=synthetic:fluorescence)",
    )
    pairing = p.add_argument_group("several sources (the server pairs their frames by capture time)")
    pairing.add_argument(
        "--pair-policy",
        choices=_MODES,
        default="wait",
        help="wait: a leading frame waits up to --pair-wait-ms for a partner within the tolerance; newest: the newest "
        "partner not older than --pair-max-age-ms; drop: only a partner already there (default: wait)",
    )
    pairing.add_argument(
        "--pair-tolerance-ms", type=float, default=0.0, help="largest skew of a set (default: half the faster period)"
    )
    pairing.add_argument("--pair-wait-ms", type=float, default=0.0, help="wait policy (default: three tolerances)")
    pairing.add_argument("--pair-max-age-ms", type=float, default=0.0, help="newest policy (default: two tolerances)")
    p.add_argument("--model", default="", help="model name (optional when the server has one)")
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--fast", action="store_true", help="send as fast as the server answers, not at the source's rate")
    p.add_argument("--frames", type=int, default=None, help="stop after this many frames")
    p.add_argument("--loop", action="store_true", help="repeat a finite source")
    p.add_argument("--save", type=Path, help="write an overlay video: .mp4 (H.264), .webm (VP9) or .avi (MJPEG)")
    p.add_argument("--summary", type=Path, help="write the latency summary as JSON")
    archive = p.add_argument_group("results to an archive (DICOM)")
    archive.add_argument(
        "--results-to",
        metavar="URL",
        help="store the results in an archive: dicomweb+http(s)://HOST:PORT/PATH (STOW-RS) or "
        "dicom(s)://CALLED_AET@HOST:PORT (C-STORE; dicoms: over TLS); over TLS, ?ca=PEM&cert=PEM&key=PEM name the "
        "CA to trust and a client certificate; a dicom: source's masks become a DICOM Segmentation of it, "
        "its classes or boxes a Measurement Report (SR), another source's key frames Secondary Capture images "
        "with their Segmentation or report",
    )
    archive.add_argument(
        "--study-context",
        type=Path,
        metavar="FILE",
        help="a source that is not DICOM: the patient and study its key frames belong to (.json or .toml)",
    )
    archive.add_argument(
        "--key-frames",
        metavar="POLICY",
        help=f"which answered frames to store: every:SECONDS, on-alert, or both comma-separated "
        f"(default {DEFAULT_POLICY})",
    )
    archive.add_argument(
        "--max-key-frames",
        type=int,
        default=DEFAULT_MAX_FRAMES,
        help=f"store at most this many key frames (default {DEFAULT_MAX_FRAMES})",
    )
    archive.add_argument(
        "--seg-type",
        choices=["binary", "fractional"],
        default="binary",
        help="a mask's DICOM Segmentation: binary (the mask), or fractional (each label's probability, 8-bit, as "
        "the server sends it when asked; costs a resize and a PNG per label a frame) (default binary)",
    )
    archive.add_argument(
        "--audit-log",
        type=Path,
        metavar="PATH",
        help="append each DICOM object written and each one the archive confirmed to this hash-chained audit trail "
        "(check it with `edgescope audit verify PATH`)",
    )
    archive.add_argument(
        "--audit-syslog",
        metavar="URL",
        help="also send each audit record to the hospital's audit repository (IHE ATNA), as serve does: "
        "tls://HOST:PORT[?ca=PEM&cert=PEM&key=PEM] or tcp://HOST:PORT",
    )
    add_outbox(p)
    p.add_argument("--mask-encoding", default="png", choices=["png", "rle"])
    p.add_argument("--policy", choices=["every", "live"], help="live: newest frame wins; every: all frames (default)")
    p.add_argument("--deadline-ms", type=int, default=0, help="per-frame budget from server receipt")
    p.add_argument("--max-message-mb", type=int, default=64)
    add_client_security(p)


def run(args: argparse.Namespace) -> int:
    from edgescope.runtime.client.stream import StreamOptions, stream_source
    from edgescope.runtime.sources.merged import describe_sources, named_sources, open_sources
    from edgescope.v1 import stream_pb2

    named = named_sources(args.source)
    spec = describe_sources(named)
    if args.results_to and len(named) > 1:
        raise ConfigError("--results-to stores the results of one source; this stream has several sources")
    # Checked before anything is streamed: a wrong study context must not cost the procedure's results.
    recording = _recording(args, spec)
    trail = _trail(args)

    options = StreamOptions(
        target=args.target,
        model=args.model,
        realtime=not args.fast,
        max_frames=args.frames,
        save=args.save,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        mask_encoding=stream_pb2.MASK_ENCODING_RLE if args.mask_encoding == "rle" else stream_pb2.MASK_ENCODING_PNG,
        policy={"live": stream_pb2.STREAM_POLICY_LIVE, "every": stream_pb2.STREAM_POLICY_EVERY}.get(
            args.policy or "", stream_pb2.STREAM_POLICY_UNSPECIFIED
        ),
        deadline_ms=args.deadline_ms,
        security=client_security(args),
        pairing=None
        if len(named) == 1
        else stream_pb2.PairingPolicy(
            mode=stream_pb2.PairingPolicy.Mode.Value(f"MODE_{args.pair_policy.upper()}"),
            tolerance_ms=args.pair_tolerance_ms,
            wait_ms=args.pair_wait_ms,
            max_age_ms=args.pair_max_age_ms,
        ),
        want_probabilities=bool(args.results_to) and args.seg_type == "fractional",
    )
    with open_sources(named, args.loop) as source:
        recorder = recording(source.kind) if recording is not None else None
        pace = "as fast as possible" if args.fast else f"at {source.fps:.1f} fps"
        print(f"streaming {spec} to {args.target} {pace}")
        report = asyncio.run(stream_source(source, options, recorder.observe if recorder is not None else None))
    archive = None
    if recorder is not None:
        from edgescope.runtime.archive.outbox import Outbox

        archive = recorder.deliver(args.results_to, Outbox(args.outbox), args.delivery_timeout)
        if trail is not None:
            from edgescope.runtime.archive.audit import record_results

            record_results(trail, archive, by="client", model=recorder.kept.provenance.model)
            trail.close()
        print(
            f"results: {len(archive['delivered'])} object(s) stored at {args.results_to}, {archive['waiting']} waiting"
        )
        if "key_frames" in archive:
            kept = archive["key_frames"]
            print(f"key frames ({kept['policy']}): {kept['kept']} stored, {kept['over_the_limit']} over the limit")
    print(report.latency.format_table())
    if report.sources is not None:
        print(report.sources.format_line())
    if report.video is not None:
        print(f"overlay video: {report.video}")
    if args.summary is not None:
        summary = {
            "source": spec,
            "target": args.target,
            "model": args.model,
            "sent": report.sent,
            "realtime": not args.fast,
            **report.latency.as_dict(),
            "clock": report.clock.as_dict(),
            "rate_warnings": report.rate_warnings,
            "error": report.error,
            **({"archive": archive} if archive is not None else {}),
            **(report.sources.as_dict() if report.sources is not None else {}),
        }
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"summary: {args.summary}")
    if report.error:
        print(f"edgescope stream: {report.error}", file=sys.stderr)
    if archive is not None and archive["waiting"]:
        print(f"edgescope stream: results still in the outbox: {archive['error']}", file=sys.stderr)
    waiting = archive is not None and archive["waiting"]
    return 1 if report.latency.errors or report.error or waiting else 0


def _trail(args: argparse.Namespace) -> AuditTrail | None:
    """The audit trail of --audit-log (forwarded by --audit-syslog), verified before anything is streamed;
    None without it."""
    if args.audit_log is not None and not args.results_to:
        raise ConfigError("--audit-log records the DICOM objects --results-to stores: give --results-to URL")
    from edgescope.runtime.archive.atna import open_trail

    return open_trail(args.audit_log, args.audit_syslog)


def _recording(args: argparse.Namespace, spec: str) -> Callable[[SourceKind], Recorder] | None:
    """What records the results for --results-to, made once the source's kind is known; None without it."""
    if not args.results_to:
        if args.study_context is not None or args.key_frames is not None or args.seg_type != "binary":
            raise ConfigError(
                "--study-context, --key-frames and --seg-type say how results are stored: give --results-to URL"
            )
        return None
    from edgescope.runtime.archive.key_frames import KeyFrameChooser, parse_key_frames
    from edgescope.runtime.archive.recorders import CineRecorder, KeyFrameRecorder
    from edgescope.runtime.archive.senders import sender_for
    from edgescope.runtime.archive.study import load_study_context
    from edgescope.runtime.client.archive import dicom_source, server_label_codes

    sender_for(args.results_to)  # a wrong URL fails before the stream, not after it
    cine = dicom_source(spec)
    if cine is not None:
        if args.study_context is not None or args.key_frames is not None:
            raise ConfigError(
                "a dicom: source's results go into its own study, for every analysed frame: "
                "leave out --study-context and --key-frames"
            )
        return lambda kind: CineRecorder(
            cine, server_label_codes(args.target, client_security(args)), seg_type=args.seg_type
        )
    if args.study_context is None:
        raise ConfigError(
            "--results-to with a source that is not DICOM needs --study-context FILE: "
            "the patient and study its key frames are stored in"
        )
    study = load_study_context(args.study_context)
    policy = parse_key_frames(args.key_frames or DEFAULT_POLICY, args.max_key_frames)
    return lambda kind: KeyFrameRecorder(
        study, KeyFrameChooser(policy), kind, server_label_codes(args.target, client_security(args)), args.seg_type
    )
