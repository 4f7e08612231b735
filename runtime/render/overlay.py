"""Draw a result over its frame, with its text and legend in a band below the image.

The frame's own pixels carry only what the model found (mask outlines and
fill, boxes, heat map, displacement arrows); the text (model, timings,
quantities, status) and the legend go into a dark band added below the
frame, so they never cover the scanner's burned-in annotations. Text is
sized from the frame's width, so it reads the same on a 480-px cine and a
3000-px radiograph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.runtime.pipeline.encode import decode_mask, decode_tensor
from edgescope.v1 import stream_pb2

__all__ = ["Drawing", "draw_overlay", "drawing_of", "render_result"]

RGB8 = npt.NDArray[np.uint8]
_ALPHA = 0.35
_OUTLINE = (255, 230, 0)
_TEXT = (255, 255, 255)
_BAND = (24, 24, 24)
# Label colours (RGB), by class index; label 1 is the green the overlay has always used.
_PALETTE = [(40, 220, 90), (250, 80, 80), (80, 150, 255), (250, 200, 40), (200, 90, 250), (60, 220, 220)]


def load_fonts() -> None:
    """OpenCV builds its Hershey font tables on first use, some 25 ms: pay that before frames arrive."""
    cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, 1.0, 1)


def _colour(index: int) -> tuple[int, int, int]:
    return _PALETTE[(index - 1) % len(_PALETTE)]


@dataclass(slots=True)
class Drawing:
    """What to draw for one result, decoded from its outputs."""

    mask: npt.NDArray[np.uint8] | None = None
    mask_labels: list[str] = field(default_factory=list)
    boxes: list[stream_pb2.Box] = field(default_factory=list)
    classes: list[tuple[str, float]] = field(default_factory=list)
    heatmap: npt.NDArray[np.uint8] | None = None
    displacement: npt.NDArray[np.float32] | None = None
    displacement_unit: str = "px"


def drawing_of(result: stream_pb2.Result) -> Drawing:
    """Everything drawable in a result's outputs."""
    drawing = Drawing()
    for output in result.outputs:
        kind = output.WhichOneof("value")
        if kind == "mask":
            drawing.mask = decode_mask(output.mask)
            drawing.mask_labels = list(output.mask.labels)
        elif kind == "boxes":
            drawing.boxes = list(output.boxes.boxes)
        elif kind == "classes":
            ranked = sorted(zip(output.classes.labels, output.classes.scores, strict=False), key=lambda p: -p[1])
            drawing.classes = [(label, float(score)) for label, score in ranked[:3]]
        elif kind == "image" and output.name == "heatmap":
            decoded = cv2.imdecode(np.frombuffer(output.image.data, np.uint8), cv2.IMREAD_GRAYSCALE)
            drawing.heatmap = None if decoded is None else np.asarray(decoded, dtype=np.uint8)
        elif kind == "tensor" and output.name.startswith("displacement_"):
            drawing.displacement = decode_tensor(output.tensor)
            drawing.displacement_unit = output.name.removeprefix("displacement_")
    return drawing


def render_result(frame_rgb: RGB8, result: stream_pb2.Result, lines: list[str], rows: int | None = None) -> RGB8:
    """The frame with everything the result holds drawn over it, and ``lines`` plus a legend below.

    ``rows`` fixes the band at that many text rows plus the legend's (lines
    beyond them are left out), so every frame of a video has the same size.
    """
    return _render(frame_rgb, drawing_of(result), lines, rows)


def draw_overlay(frame_rgb: RGB8, mask: npt.NDArray[np.uint8] | None, lines: list[str]) -> RGB8:
    """The frame with a mask drawn over it and ``lines`` in the band below."""
    return _render(frame_rgb, Drawing(mask=mask), lines, None)


def _render(frame_rgb: RGB8, drawing: Drawing, lines: list[str], rows: int | None) -> RGB8:
    image: RGB8 = frame_rgb.copy()
    height, width = image.shape[:2]
    legend: list[tuple[tuple[int, int, int], str]] = []
    thickness = max(1, round(width / 640))
    if drawing.heatmap is not None and drawing.heatmap.shape == (height, width):
        heat = cv2.cvtColor(cv2.applyColorMap(drawing.heatmap, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
        image = np.asarray(cv2.addWeighted(image, 0.6, heat, 0.4, 0.0), dtype=np.uint8)
        legend += [((0, 0, 160), "heat map: low"), ((160, 0, 0), "high")]
    if drawing.mask is not None and drawing.mask.shape == (height, width) and drawing.mask.any():
        present = np.flatnonzero(np.bincount(drawing.mask.ravel(), minlength=2))
        for index in (int(v) for v in present if v):
            region = drawing.mask == index
            fill = np.array(_colour(index), dtype=np.float32)
            image[region] = (image[region] * (1 - _ALPHA) + fill * _ALPHA).astype(np.uint8)
            contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(image, contours, -1, _OUTLINE, thickness, cv2.LINE_AA)
            name = drawing.mask_labels[index] if index < len(drawing.mask_labels) else f"label {index}"
            legend.append((_colour(index), f"mask: {name}"))
    seen: set[int] = set()
    for box in drawing.boxes:
        colour = _colour(box.label_index + 1)
        start, end = (round(box.x_min), round(box.y_min)), (round(box.x_max), round(box.y_max))
        cv2.rectangle(image, start, end, colour, thickness, cv2.LINE_AA)
        if box.label_index not in seen:
            seen.add(box.label_index)
            legend.append((colour, f"box: {box.label or box.label_index}"))
    if drawing.displacement is not None and drawing.displacement.shape[1:] == (height, width):
        _arrows(image, drawing.displacement, thickness)
        legend.append(((255, 160, 0), f"displacement arrows ({drawing.displacement_unit}, x4)"))
    text = [*(line for line in lines if line), *(f"{label}: {score:.2f}" for label, score in drawing.classes)]
    return _with_band(image, text, legend, rows)


def _arrows(image: RGB8, field: npt.NDArray[np.float32], thickness: int) -> None:
    """Arrows on a grid, four times the displacement so small motion shows; NaN (uncalibrated) is skipped."""
    height, width = image.shape[:2]
    step = max(16, min(height, width) // 16)
    for y in range(step // 2, height, step):
        for x in range(step // 2, width, step):
            dy, dx = float(field[0, y, x]), float(field[1, y, x])
            if not (np.isfinite(dy) and np.isfinite(dx)) or abs(dx) + abs(dy) < 0.05:
                continue
            tip = (round(x + 4 * dx), round(y + 4 * dy))
            cv2.arrowedLine(image, (x, y), tip, (255, 160, 0), thickness, cv2.LINE_AA, tipLength=0.3)


def _with_band(
    image: RGB8, lines: list[str], legend: list[tuple[tuple[int, int, int], str]], fixed_rows: int | None
) -> RGB8:
    width = image.shape[1]
    scale = max(0.4, width / 1400)
    thickness = max(1, round(scale * 1.6))
    (_, text_h), baseline = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    line_h = text_h + baseline + max(4, text_h // 2)
    if fixed_rows is not None:
        lines = lines[:fixed_rows]
        rows = fixed_rows + 1
    else:
        rows = len(lines) + (1 if legend else 0)
    if rows == 0:
        return image
    band = np.full((rows * line_h + line_h // 2, width, 3), _BAND, dtype=np.uint8)
    margin = max(6, text_h // 2)
    for row, text in enumerate(lines):
        _put(
            band,
            _fit(text, width - 2 * margin, scale, thickness),
            (margin, (row + 1) * line_h - baseline),
            scale,
            thickness,
        )
    if legend:
        x, y = margin, rows * line_h - baseline
        for colour, label in legend:
            label_w = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0]
            if x + text_h + margin + label_w > width:
                break
            cv2.rectangle(band, (x, y - text_h), (x + text_h, y), colour, -1)
            _put(band, label, (x + text_h + margin // 2, y), scale, thickness)
            x += text_h + margin + label_w + 2 * margin
    return np.ascontiguousarray(np.vstack([image, band]), dtype=np.uint8)


def _fit(text: str, room: int, scale: float, thickness: int) -> str:
    """``text`` cut (ending in "...") to fit ``room`` pixels; OpenCV's fonts are ASCII only.

    The cut is found by bisection: a caption may hold a caller's text of any length.
    """

    def width(candidate: str) -> int:
        return int(cv2.getTextSize(candidate, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0])

    # No glyph is narrower than a pixel, so at most ``room`` characters can fit.
    if len(text) <= room and width(text) <= room:
        return text
    low, high = 0, min(len(text) - 1, room)
    while low < high:
        middle = (low + high + 1) // 2
        if width(text[:middle] + "...") <= room:
            low = middle
        else:
            high = middle - 1
    return text[:low] + "..." if low else ""


def _put(band: RGB8, text: str, origin: tuple[int, int], scale: float, thickness: int) -> None:
    cv2.putText(band, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, _TEXT, thickness, cv2.LINE_AA)
