"""Small line plots drawn with PIL, for evaluation reports.

matplotlib is not a dependency of this project, and the evaluation plots are simple:
a few named series of (x, y) points over shared axes (FID against blur radius, one line
per reranking size, and the like). `line_plot` draws exactly that into a PNG: a framed
plot area, "nice" ticks on both axes (or the given x ticks, optionally on a log2 x axis
for reranking sizes 1, 2, 4, ...), axis labels, a title, one coloured line with point
markers per series and a legend to the right. Missing values (None or NaN) leave a gap.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

# Distinguishable line colours (the usual "tab10" hues).
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


@dataclasses.dataclass(frozen=True)
class Series:
    """One line: its legend ``label`` and its points (``y`` None or NaN: no point)."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without scalable default font
        return ImageFont.load_default()


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """About ``target`` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten)
    covering ``[lo, hi]``; the first tick is <= lo and the last >= hi."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, target)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks = []
    t = first
    while t < hi + step * 0.999:
        ticks.append(round(t, 12))
        if ticks[-1] >= hi - 1e-12 * max(1.0, abs(hi)):
            break
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.2g}"
    return f"{v:.6g}"


def line_plot(path: str, series: Sequence[Series], *, title: str = "", xlabel: str = "",
              ylabel: str = "", x_ticks: Sequence[float] | None = None, x_log2: bool = False,
              size: tuple[int, int] = (720, 440)) -> str:
    """Draws ``series`` as lines with markers into a PNG at ``path`` (written through a
    temporary file); returns ``path``.

    Args:
        series: the lines; their colours follow `PALETTE` in order.
        x_ticks: tick positions on the x axis (default: round values over the data).
        x_log2: place x on a log2 scale (all x must be > 0), e.g. reranking sizes.
        size: the image's (width, height) in pixels.

    Raises ValueError when no series has a finite point.
    """
    pts = [(x, y) for s in series for x, y in zip(s.x, s.y) if _finite(y) and _finite(x)]
    if not pts:
        raise ValueError(f"nothing to plot for {title or path!r}: no finite points")

    def tx(x: float) -> float:
        if x_log2:
            if x <= 0:
                raise ValueError(f"x_log2 needs positive x, got {x}")
            return math.log2(x)
        return float(x)

    xs = [tx(x) for x, _ in pts] + [tx(x) for x in (x_ticks or ())]
    ys = [float(y) for _, y in pts]
    if x_ticks is None:
        xt = [2.0 ** e for e in range(math.floor(min(xs)), math.ceil(max(xs)) + 1)] \
            if x_log2 else nice_ticks(min(xs), max(xs))
    else:
        xt = [float(v) for v in x_ticks]
    yt = nice_ticks(min(ys), max(ys))
    x_lo, x_hi = min(xs + [tx(v) for v in xt]), max(xs + [tx(v) for v in xt])
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = yt[0], yt[-1]

    width, height = size
    font, small = _font(14), _font(12)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    legend_w = 20 + max(int(draw.textlength(s.label, font=small)) for s in series) + 30
    left, right, top, bottom = 74, width - legend_w - 10, 40, height - 56
    if right - left < 100:
        raise ValueError(f"plot {width}x{height} is too narrow for its legend")
    # Data range sits inside the frame with a small margin.
    mx = 0.04 * (x_hi - x_lo)

    def px(x: float) -> float:
        return left + (tx(x) - (x_lo - mx)) / ((x_hi + mx) - (x_lo - mx)) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

    grid, axis = (230, 230, 230), (60, 60, 60)
    for v in yt:
        y = py(v)
        draw.line([(left, y), (right, y)], fill=grid)
        draw.line([(left - 5, y), (left, y)], fill=axis)
        label = _fmt(v)
        draw.text((left - 8 - draw.textlength(label, font=small), y - 7), label, fill=axis,
                  font=small)
    for v in xt:
        x = px(v)
        draw.line([(x, top), (x, bottom)], fill=grid)
        draw.line([(x, bottom), (x, bottom + 5)], fill=axis)
        label = _fmt(v)
        draw.text((x - draw.textlength(label, font=small) / 2, bottom + 8), label, fill=axis,
                  font=small)
    draw.rectangle([left, top, right, bottom], outline=axis)
    if title:
        draw.text(((left + right) / 2 - draw.textlength(title, font=font) / 2, 12), title,
                  fill="black", font=font)
    if xlabel:
        draw.text(((left + right) / 2 - draw.textlength(xlabel, font=font) / 2, bottom + 28),
                  xlabel, fill="black", font=font)
    if ylabel:
        w = int(draw.textlength(ylabel, font=font)) + 4
        label_img = Image.new("RGB", (w, 20), "white")
        ImageDraw.Draw(label_img).text((2, 1), ylabel, fill="black", font=font)
        label_img = label_img.rotate(90, expand=True)
        img.paste(label_img, (8, int((top + bottom) / 2 - w / 2)))

    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        segment: list[tuple[float, float]] = []
        points = sorted(((x, y) for x, y in zip(s.x, s.y) if _finite(x)), key=lambda p: p[0])
        for x, y in points + [(None, None)]:
            if x is not None and _finite(y):
                segment.append((px(x), py(float(y))))
                continue
            if len(segment) > 1:
                draw.line(segment, fill=colour, width=2)
            for cx, cy in segment:
                draw.ellipse([cx - 3.5, cy - 3.5, cx + 3.5, cy + 3.5], fill=colour)
            segment = []
        ly = top + 8 + 20 * i
        lx = right + 14
        draw.line([(lx, ly + 7), (lx + 22, ly + 7)], fill=colour, width=2)
        draw.ellipse([lx + 7.5, ly + 3.5, lx + 14.5, ly + 10.5], fill=colour)
        draw.text((lx + 28, ly), s.label, fill="black", font=small)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
