"""Frame sources: where frames come from before they are sent for inference.

:func:`open_source` opens one from a spec string (see ``SPEC_FORMS``). The
source modules are imported only when their scheme is used, so importing this
package does not load pydicom or OpenCV.
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
    "dicom:PATH",
    "video:PATH",
    "synthetic:ultrasound[?frames=N&seed=S&fps=F&height=H&width=W]",
    "synthetic:endoscopy[?frames=N&seed=S&fps=F&height=H&width=W]",
)
"""The source specs :func:`open_source` accepts."""

_SYNTHETIC_PARAMS: dict[str, tuple[str, type[int] | type[float]]] = {
    "frames": ("n_frames", int),
    "seed": ("seed", int),
    "fps": ("fps", float),
    "height": ("height", int),
    "width": ("width", int),
}


def open_source(spec: str, *, loop: bool = False) -> FrameSource:
    """Open the frame source that ``spec`` names; ``loop`` replays a file source endlessly.

    Raises ConfigError for a malformed spec and SourceError when the named
    file cannot be read.
    """
    scheme, colon, rest = spec.partition(":")
    scheme = scheme.strip().lower()
    if not colon or not rest.strip():
        raise ConfigError(f"invalid source {spec!r}; expected one of: {', '.join(SPEC_FORMS)}")
    if scheme == "dicom":
        from edgescope.runtime.sources.dicom import DicomCineSource

        return DicomCineSource(Path(rest).expanduser(), loop=loop)
    if scheme == "video":
        from edgescope.runtime.sources.video import VideoFileSource

        return VideoFileSource(Path(rest).expanduser(), loop=loop)
    if scheme == "synthetic":
        return _open_synthetic(spec, rest, loop=loop)
    raise ConfigError(f"unknown source scheme {scheme!r} in {spec!r}; expected one of: {', '.join(SPEC_FORMS)}")


def _open_synthetic(spec: str, rest: str, *, loop: bool) -> FrameSource:
    from edgescope.runtime.sources.endoscopy import SyntheticEndoscopySource
    from edgescope.runtime.sources.synthetic import SyntheticUltrasoundSource

    simulated, _, query = rest.partition("?")
    simulators = {"ultrasound": SyntheticUltrasoundSource, "endoscopy": SyntheticEndoscopySource}
    if simulated not in simulators:
        raise ConfigError(
            f"unknown synthetic source {simulated!r} in {spec!r}; expected {SPEC_FORMS[2]} or {SPEC_FORMS[3]}"
        )
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise ConfigError(f"malformed parameters in {spec!r}: {exc}") from exc
    kwargs: dict[str, Any] = {}
    for key, value in pairs:
        if key not in _SYNTHETIC_PARAMS:
            raise ConfigError(f"unknown parameter {key!r} in {spec!r}; known: {', '.join(_SYNTHETIC_PARAMS)}")
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
    if simulated == "endoscopy":
        return SyntheticEndoscopySource(**kwargs)
    return SyntheticUltrasoundSource(**kwargs)
