"""`slip profile step --png FILE`: a stacked-bar PNG of a training step's time per stage, one bar per config."""
from __future__ import annotations

import colorsys
import math
import numbers
import re
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFont

from pipeline.atomic import replacing

PLOT_HEIGHT = 320  # pixels from baseline to the top tick
BAR_WIDTH = 56
SLOT = 112  # pixels per bar including the gap; labels are wrapped to fit inside it
MARGIN = 12
MAX_LABEL_LINES = 5
# tab10-like, dark enough that black text stays readable beside them and far from white/grey/black
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138)]


def stage_colour(i: int) -> tuple[int, int, int]:
    """Colour of the i-th stage in first-seen order; past the palette, golden-ratio hues stay distinct."""
    if i < len(PALETTE):
        return PALETTE[i]
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.8)
    return round(r * 255), round(g * 255), round(b * 255)


class Geometry(NamedTuple):
    width: int
    height: int
    top: int  # y of the top tick (y_max)
    baseline: int  # y of the x axis; bars fill the rows above it
    left: int  # x of the y axis; slot i spans left + i*SLOT .. left + (i+1)*SLOT
    scale: float  # pixels per unit
    y_max: float
    step: float
    centres: tuple[int, ...]
    legend_x: int
    line_h: int


def _wrap(text: str, font, width: float) -> list[str]:
    """Greedy wrap by pixel width; long words like dotted overrides break after '.', '=', '/' or ',' first."""
    lines: list[str] = []
    for word in text.split():
        atoms = re.findall(r"[^.=/,]*[.=/,]+|[^.=/,]+", word)
        for j, atom in enumerate(atoms):
            while len(atom) > 1 and font.getlength(atom) > width:  # no break point fits: cut by character
                k = max((k for k in range(1, len(atom)) if font.getlength(atom[:k]) <= width), default=1)
                lines.append(atom[:k])
                atom = atom[k:]
            joined = (lines[-1] + ("" if j else " ") + atom) if lines else atom
            if lines and font.getlength(joined) <= width:
                lines[-1] = joined
            else:
                lines.append(atom)
    if len(lines) > MAX_LABEL_LINES:  # bound the chart's height; a label's tail is rarely what tells it apart
        lines = lines[:MAX_LABEL_LINES]
        lines[-1] = lines[-1][:-3] + "..."
    return lines or [""]


def _nice_step(span: float) -> float:
    # 1-2-5 steps giving about five ticks, so tick labels are round numbers
    raw = span / 5
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"  # "812 ms", "1,204 ms", "0.5 ms"


def _stages(bars: list[tuple[str, dict[str, float]]]) -> list[str]:
    return list(dict.fromkeys(s for _, times in bars for s in times))


def bar_geometry(bars: list[tuple[str, dict[str, float]]], title: str = "", unit: str = "ms") -> Geometry:
    """Where everything goes; shared by the drawing and by tests that read pixels back."""
    font = ImageFont.load_default()
    line_h = int(font.getbbox("Ag")[3]) + 3
    max_total = max((sum(t.values()) for _, t in bars), default=0.0)
    step = _nice_step(max_total) if max_total > 0 else 1.0  # all-zero bars still get an axis
    y_max = step * max(1, math.ceil(max_total / step - 1e-9))
    ticks = [k * step for k in range(round(y_max / step) + 1)]
    left = MARGIN + int(max(font.getlength(f"{_fmt(t)} {unit}") for t in ticks)) + 8
    top = MARGIN + (2 * line_h if title else 0) + line_h  # room for the total above the tallest bar
    baseline = top + PLOT_HEIGHT
    centres = tuple(left + SLOT * i + SLOT // 2 for i in range(len(bars)))
    label_lines = max((len(_wrap(lab, font, SLOT - 8)) for lab, _ in bars), default=1)
    legend_x = left + SLOT * len(bars) + 16
    names = _stages(bars)
    width = legend_x + 18 + int(max((font.getlength(s) for s in names), default=0)) + MARGIN
    width = max(width, int(font.getlength(title)) + 2 * MARGIN)
    height = max(baseline + 6 + label_lines * line_h + MARGIN, top + len(names) * (line_h + 4) + MARGIN)
    return Geometry(width, height, top, baseline, left, PLOT_HEIGHT / y_max, y_max, step, centres, legend_x, line_h)


def _validate(bars: list[tuple[str, dict[str, float]]], path: Path) -> None:
    if not bars:
        raise ValueError("stage_chart: no bars to draw")
    for label, times in bars:
        for stage, ms in times.items():
            if not isinstance(ms, numbers.Real) or not math.isfinite(ms) or ms < 0:  # numpy scalars are Real too
                raise ValueError(f"stage_chart: bar {label!r} stage {stage!r}: "
                                 f"time must be finite and >= 0, got {ms!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"stage_chart: output directory does not exist: {path.parent}")


def stage_chart(bars: list[tuple[str, dict[str, float]]], path: str | Path, *,
                title: str = "", unit: str = "ms") -> Path:
    """Draw one stacked bar per (label, {stage: time}) and write it atomically as a PNG; returns the path."""
    path = Path(path)
    _validate(bars, path)
    bars = [(label, {s: float(v) for s, v in times.items()}) for label, times in bars]
    g = bar_geometry(bars, title, unit)
    font = ImageFont.load_default()
    colour = {s: stage_colour(i) for i, s in enumerate(_stages(bars))}
    image = Image.new("RGB", (g.width, g.height), "white")
    draw = ImageDraw.Draw(image)
    if title:
        draw.text(((g.width - font.getlength(title)) / 2, MARGIN), title, fill="black", font=font)
    right = g.left + SLOT * len(bars)
    for k in range(round(g.y_max / g.step) + 1):
        y = g.baseline - round(k * g.step * g.scale)
        draw.line([(g.left, y), (right, y)], fill=(225, 225, 225))  # gridlines first so bars cover them
        text = f"{_fmt(k * g.step)} {unit}"
        draw.text((g.left - 6 - font.getlength(text), y - g.line_h // 2), text, fill="black", font=font)
    for (label, times), cx in zip(bars, g.centres):
        x0, x1 = cx - BAR_WIDTH // 2, cx + BAR_WIDTH // 2 - 1
        cum, y_prev = 0.0, g.baseline
        for stage, ms in times.items():  # the bar's own order is the order its stages happen
            cum += ms
            y = g.baseline - round(cum * g.scale)  # round the running sum so segments add up to the exact total
            if y < y_prev:
                draw.rectangle([x0, y, x1, y_prev - 1], fill=colour[stage])
            y_prev = y
        total = f"{_fmt(cum)} {unit}"
        draw.text((cx - font.getlength(total) / 2, y_prev - g.line_h - 2), total, fill="black", font=font)
        for n, line in enumerate(_wrap(label, font, SLOT - 8)):
            draw.text((cx - font.getlength(line) / 2, g.baseline + 6 + n * g.line_h), line, fill="black", font=font)
    draw.line([(g.left, g.top), (g.left, g.baseline), (right, g.baseline)], fill="black")
    for i, (stage, rgb) in enumerate(colour.items()):
        y = g.top + i * (g.line_h + 4)
        draw.rectangle([g.legend_x, y, g.legend_x + 11, y + g.line_h - 2], fill=rgb)
        draw.text((g.legend_x + 18, y), stage, fill="black", font=font)
    with replacing(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    return path
