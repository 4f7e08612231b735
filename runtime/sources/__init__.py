"""Frame sources: where frames come from before they are sent for inference.

:func:`open_source` opens one from a spec string (see ``SPEC_FORMS``). The
source modules are imported only when their scheme is used, so importing this
package does not load pydicom, OpenCV or PyAV.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from edgescope.errors import ConfigError
from edgescope.runtime.sources.base import FrameSource, SourceFrame, SourceKind
from edgescope.runtime.sources.display import to_display_rgb8

__all__ = ["SPEC_FORMS", "FrameSource", "SourceFrame", "SourceKind", "open_source", "to_display_rgb8"]

SPEC_FORMS = (
    "dicom:PATH[?voi=N|EXPLANATION]",
    "video:PATH",
    "images:GLOB|FOLDER[?fps=F]",
    "npy:PATH.npy[?fps=F]",
    "v4l2:/dev/videoN[?width=W&height=H&fps=F&fourcc=MJPG]",
    "rtsp://... | rtsps://... | http(s)://... | udp://... | srt://...",
    "gst:PIPELINE ! appsink",
    "synthetic:ultrasound[?frames=N&seed=S&fps=F&height=H&width=W]",
    "synthetic:endoscopy[?frames=N&seed=S&fps=F&height=H&width=W]",
    "synthetic:fluorescence[?frames=N&seed=S&fps=F&height=H&width=W]",
    "synthetic:ecg[?frames=N&seed=S&fps=F&bpm=B&rate=HZ&window=SAMPLES]",
)
"""The source specs :func:`open_source` accepts."""

_SYNTHETIC_PARAMS: dict[str, tuple[str, type[int] | type[float]]] = {
    "frames": ("n_frames", int),
    "seed": ("seed", int),
    "fps": ("fps", float),
    "height": ("height", int),
    "width": ("width", int),
    "bpm": ("bpm", float),
    "rate": ("rate_hz", float),
    "window": ("window", int),
}
# The simulated images have a size; the simulated ECG a heart rate, a sample rate and a window.
_SIGNAL_ONLY = {"bpm", "rate", "window"}
_IMAGE_ONLY = {"height", "width"}


def open_source(spec: str, *, loop: bool = False) -> FrameSource:
    """Open the frame source that ``spec`` names; ``loop`` replays a file source endlessly.

    Raises ConfigError for a malformed spec, SourceError when the file,
    device or stream cannot be read, and MissingDependencyError when this
    installation cannot read that kind of source (with how to get it).
    Live sources (devices, live streams) are endless already; a network stream with an end
    (a file served over HTTP) ends with it, or plays again with ``loop``.
    """
    from edgescope.runtime.sources.network import NETWORK_SCHEMES

    scheme, colon, rest = spec.partition(":")
    scheme = scheme.strip().lower()
    if not colon or not rest.strip():
        raise ConfigError(f"invalid source {spec!r}; expected one of: {', '.join(SPEC_FORMS)}")
    if scheme in NETWORK_SCHEMES and rest.startswith("//"):
        from edgescope.runtime.sources.network import open_network_source

        return open_network_source(spec.strip(), loop=loop)
    if scheme == "dicom":
        from edgescope.runtime.sources.dicom import DicomCineSource

        path, options = _split_options(spec, rest, {"voi": str})
        return DicomCineSource(Path(path).expanduser(), loop=loop, voi=str(options.get("voi", "")))
    if scheme == "video":
        return _open_video(rest, loop=loop)
    if scheme == "images":
        from edgescope.runtime.sources.images import ImageFolderSource

        pattern, options = _split_options(spec, rest, {"fps": float})
        return ImageFolderSource(pattern, loop=loop, **options)
    if scheme == "npy":
        from edgescope.runtime.sources.arrays import ArrayFileSource

        path, options = _split_options(spec, rest, {"fps": float})
        return ArrayFileSource(Path(path).expanduser(), loop=loop, **options)
    if scheme == "v4l2":
        from edgescope.runtime.sources.camera import open_v4l2_source, parse_v4l2

        return open_v4l2_source(parse_v4l2(rest))
    if scheme in ("gst", "gstreamer"):
        from edgescope.runtime.sources.camera import open_gstreamer_source

        return open_gstreamer_source(rest)
    if scheme == "synthetic":
        return _open_synthetic(spec, rest, loop=loop)
    raise ConfigError(f"unknown source scheme {scheme!r} in {spec!r}; expected one of: {', '.join(SPEC_FORMS)}")


def _open_video(rest: str, *, loop: bool) -> FrameSource:
    """A video file; a V4L2 device path or a stream URL given as ``video:`` opens as that live source."""
    target = rest.strip()
    if target.startswith("/dev/video"):
        from edgescope.runtime.sources.camera import open_v4l2_source, parse_v4l2

        return open_v4l2_source(parse_v4l2(target))
    if "://" in target:
        return open_source(target, loop=loop)
    from edgescope.runtime.sources.video import VideoFileSource

    return VideoFileSource(Path(target).expanduser(), loop=loop)


def _split_options(spec: str, rest: str, known: dict[str, type[str] | type[float]]) -> tuple[str, dict[str, Any]]:
    """``target?key=value&...`` -> (target, options). A trailing ``?...`` without ``=`` is part of the target
    (a glob's ``?`` wildcard)."""
    target, question, query = rest.rpartition("?")
    if not question or "=" not in query:
        return rest, {}
    options: dict[str, Any] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise ConfigError(f"malformed parameters in {spec!r}: {exc}") from exc
    for key, value in pairs:
        if key not in known:
            raise ConfigError(f"unknown parameter {key!r} in {spec!r}; known: {', '.join(known)}")
        if key in options:
            raise ConfigError(f"parameter {key!r} is given twice in {spec!r}")
        try:
            options[key] = known[key](value)
        except ValueError as exc:
            raise ConfigError(f"parameter {key}={value!r} in {spec!r} is not a number") from exc
    return target, options


def _open_synthetic(spec: str, rest: str, *, loop: bool) -> FrameSource:
    from edgescope.runtime.sources.ecg import SyntheticEcgSource
    from edgescope.runtime.sources.endoscopy import SyntheticEndoscopySource
    from edgescope.runtime.sources.fluorescence import SyntheticFluorescenceSource
    from edgescope.runtime.sources.synthetic import SyntheticUltrasoundSource

    simulated, _, query = rest.partition("?")
    simulators: dict[str, type[FrameSource]] = {
        "ultrasound": SyntheticUltrasoundSource,
        "endoscopy": SyntheticEndoscopySource,
        "fluorescence": SyntheticFluorescenceSource,
        "ecg": SyntheticEcgSource,
    }
    if simulated not in simulators:
        expected = ", ".join(form for form in SPEC_FORMS if form.startswith("synthetic:"))
        raise ConfigError(f"unknown synthetic source {simulated!r} in {spec!r}; expected one of: {expected}")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise ConfigError(f"malformed parameters in {spec!r}: {exc}") from exc
    kwargs: dict[str, Any] = {}
    for key, value in pairs:
        known = [k for k in _SYNTHETIC_PARAMS if k not in (_IMAGE_ONLY if simulated == "ecg" else _SIGNAL_ONLY)]
        if key not in known:
            raise ConfigError(f"unknown parameter {key!r} in {spec!r}; known: {', '.join(known)}")
        name, convert = _SYNTHETIC_PARAMS[key]
        if name in kwargs:
            raise ConfigError(f"parameter {key!r} is given twice in {spec!r}")
        try:
            kwargs[name] = convert(value)
        except ValueError as exc:
            expected = "an integer" if convert is int else "a number"
            raise ConfigError(f"parameter {key}={value!r} in {spec!r} is not {expected}") from exc
    if loop and "n_frames" in kwargs:
        # Without frames= the cine is endless already; a fixed length and
        # endless replay contradict each other, so say so rather than pick one.
        raise ConfigError(f"{spec!r} cannot loop: leave out frames= for an endless synthetic cine")
    return simulators[simulated](**kwargs)
