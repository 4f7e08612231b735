"""Network video streams (RTSP, RTSPS, HTTP(S) MJPEG or MPEG-TS, UDP, SRT) through PyAV.

PyAV (FFmpeg's libraries, bundled in its wheels) opens each stream with its
own options and timeouts and says why it failed (protocol missing, connection
refused, HTTP 404, timeout), which OpenCV's FFmpeg backend reports only as
"not opened". Options chosen for low latency: no input buffering, RTSP over
TCP (no lost packets, no smeared frames). ``open_timeout_s`` bounds opening,
``read_timeout_s`` each read, so a dead stream is noticed within it.

Frames are RGB uint8. The stream is a ``LiveSource``: the newest frame wins,
a lost stream is reopened with backoff, and a stream with an end (a file
served over HTTP) ends the source when it ends (or plays again with ``loop``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from edgescope.errors import MissingDependencyError, SourceError
from edgescope.runtime.sources.base import SourceKind
from edgescope.runtime.sources.live import LiveSource, Reconnect

__all__ = ["NETWORK_SCHEMES", "NetworkReader", "open_network_source", "redact"]

NETWORK_SCHEMES = ("rtsp", "rtsps", "http", "https", "udp", "srt")

_LOW_LATENCY = {"fflags": "nobuffer", "flags": "low_delay"}
_OPTIONS: dict[str, dict[str, str]] = {
    "rtsp": {**_LOW_LATENCY, "rtsp_transport": "tcp"},
    "rtsps": {**_LOW_LATENCY, "rtsp_transport": "tcp"},
    # Late UDP packets are dropped rather than stopping the demuxer.
    "udp": {**_LOW_LATENCY, "overrun_nonfatal": "1"},
}


class NetworkReader:
    """One open connection to a network stream, decoding its first video stream."""

    def __init__(self, url: str, open_timeout_s: float, read_timeout_s: float) -> None:
        self._url = redact(url)
        scheme = url.partition("://")[0].lower()
        self._container: Any = _open(url, _OPTIONS.get(scheme, _LOW_LATENCY), open_timeout_s, read_timeout_s)
        # A live stream has neither a duration nor a size; a file served over the network has one or both.
        self._finite = self._container.duration is not None or self._container.size > 0
        if self._finite:
            # A file is read as a file: the low-latency flags make FFmpeg drop what it probed of a short one.
            self._container.close()
            self._container = _open(url, {}, open_timeout_s, read_timeout_s)
        if not self._container.streams.video:
            self._container.close()
            raise SourceError(f"{self._url} has no video stream")
        stream = self._container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        self._fps = float(rate) if rate else None
        self._frames = self._container.decode(stream)

    @property
    def fps(self) -> float | None:
        return self._fps

    @property
    def finite(self) -> bool:
        return self._finite

    def read(self) -> npt.NDArray[np.uint8] | None:
        import av.error

        try:
            frame = next(self._frames)
        except StopIteration:
            return None
        except (av.error.FFmpegError, OSError) as exc:
            raise SourceError(f"reading {self._url} failed: {_reason(exc)}") from exc
        return np.ascontiguousarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)

    def close(self) -> None:
        self._container.close()


def open_network_source(
    url: str,
    *,
    kind: SourceKind = "endoscopy",
    open_timeout_s: float = 10.0,
    read_timeout_s: float = 2.0,
    reconnect: Reconnect | None = None,
    loop: bool = False,
) -> LiveSource:
    """A live source reading ``url``; raises SourceError (or MissingDependencyError) when it cannot be opened.

    A stream with an end (a file served over the network) ends the source, or plays again with ``loop``.
    """
    scheme = url.partition("://")[0].lower()
    if scheme not in NETWORK_SCHEMES:
        raise SourceError(
            f"{redact(url)}: not a network stream; expected one of {', '.join(s + '://' for s in NETWORK_SCHEMES)}"
        )
    return LiveSource(
        redact(url),
        lambda: NetworkReader(url, open_timeout_s, read_timeout_s),
        kind=kind,
        reconnect=reconnect,
        loop=loop,
    )


def _open(url: str, options: dict[str, str], open_timeout_s: float, read_timeout_s: float) -> Any:
    import av
    import av.error

    scheme = url.partition("://")[0].lower()
    try:
        return av.open(url, options=options, timeout=(open_timeout_s, read_timeout_s))
    except av.error.ProtocolNotFoundError as exc:
        raise MissingDependencyError(
            f"{scheme}:// streams",
            f"the FFmpeg in this PyAV build has no {scheme} protocol (PyAV's wheels carry no libsrt); "
            "install PyAV built against an FFmpeg with it (pip install av --no-binary av)",
        ) from exc
    except (av.error.FFmpegError, OSError) as exc:
        raise SourceError(f"cannot open {redact(url)}: {_reason(exc)}") from exc


def _reason(error: Exception) -> str:
    """FFmpeg's words for what went wrong, without the URL (which may hold a password)."""
    reason = getattr(error, "strerror", None)
    return str(reason) if reason else type(error).__name__


def redact(url: str) -> str:
    """The URL without a password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.partition("@")
    if not at or "/" in credentials:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}"
