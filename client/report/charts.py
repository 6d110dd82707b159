"""Static SVG charts for the HTML report, drawn in Python so the report needs no network and
no JavaScript to show them: x/y line charts (with markers, point labels, step and area
series, scatters, error bars, vertical markers, horizontal levels and shaded bands) and a "no
data" placeholder.

Every chart is a `<figure class="chart" data-chart="NAME">`; user text is escaped here, so
callers pass plain strings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape

# Tableau 10: distinguishable, print-friendly, and readable for most colour-vision deficiencies.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#b07aa1",
    "#edc948",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)

WIDTH, HEIGHT = 640, 300
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 60, 18, 16, 44


# An open side of an error bar (a confidence interval that bounds nothing there) is a dashed
# stub this long, pointing away from the point, without a cap.
OPEN_STUB_PX = 10.0
CAP_PX = 3.0


@dataclass(frozen=True)
class ErrorBar:
    """A point's confidence interval along one axis; an open side has no bound to draw."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False


@dataclass(frozen=True)
class Series:
    """A line through points (x ascending), drawn in one colour."""

    label: str
    points: Sequence[tuple[float, float]]
    color: str
    group: str = ""  # CSS class shared by a run's elements (legend toggling)
    dashed: bool = False
    marker: str = "circle"  # circle | square | none
    point_labels: Sequence[str] = ()
    tooltips: Sequence[str] = ()
    step: bool = False  # step-after: each y holds until the next x
    fill: bool = False  # shade the area under the line
    line: bool = True  # False: the markers alone (a scatter, e.g. probes in the order they ran)
    # Per point (None: no interval): the y value's and the x value's confidence intervals.
    y_errors: Sequence[ErrorBar | None] = ()
    x_errors: Sequence[ErrorBar | None] = ()


@dataclass(frozen=True)
class Marker:
    """A vertical line at x, e.g. a percentile or a stage boundary."""

    x: float
    label: str
    color: str = "#8a8f98"
    group: str = ""
    dashed: bool = True


@dataclass(frozen=True)
class Level:
    """A horizontal line at y across the plot, e.g. an objective."""

    y: float
    label: str
    color: str = "#a40e26"
    group: str = ""


@dataclass(frozen=True)
class Band:
    """A shaded x range with a label at the top, e.g. one stage on a timeline."""

    x0: float
    x1: float
    label: str
    shade: bool


@dataclass
class Axis:
    lo: float
    hi: float
    ticks: list[float] = field(default_factory=list)

    def fraction(self, v: float) -> float:
        return (v - self.lo) / (self.hi - self.lo) if self.hi > self.lo else 0.5


def nice_step(span: float, target_ticks: int = 5) -> float:
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / target_ticks
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * magnitude:
            return m * magnitude
    return 10 * magnitude


def nice_axis(lo: float, hi: float, from_zero: bool, target_ticks: int = 5) -> Axis:
    if from_zero:
        lo = min(0.0, lo)
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    step = nice_step(hi - lo, target_ticks)
    start = math.floor(lo / step) * step
    end = math.ceil(hi / step) * step
    ticks = [start + i * step for i in range(round((end - start) / step) + 1)]
    return Axis(start, end, ticks)


def tick_text(v: float, step: float) -> str:
    decimals = 0
    while decimals < 6 and abs(round(step, decimals) - step) > step * 1e-9:
        decimals += 1
    if step >= 1000 and abs(v) >= 10_000:
        return f"{v / 1000:,g}k"
    return f"{v:,.{decimals}f}"


def _f(v: float) -> str:
    return f"{v:.1f}"


def _attrs(attrs: Mapping[str, str]) -> str:
    return "".join(f' {escape(k)}="{escape(v)}"' for k, v in attrs.items())


def empty_chart(name: str, title: str, note: str, attrs: Mapping[str, str] | None = None) -> str:
    return (
        f'<figure class="chart" data-chart="{escape(name)}" data-empty="true"{_attrs(attrs or {})}>'
        f'<h3>{escape(title)}</h3><div class="no-data">No data: {escape(note)}</div></figure>'
    )


def xy_chart(
    name: str,
    title: str,
    series: Sequence[Series],
    x_label: str,
    y_label: str,
    *,
    markers: Sequence[Marker] = (),
    levels: Sequence[Level] = (),
    bands: Sequence[Band] = (),
    x_from_zero: bool = True,
    caption: str = "",
    attrs: Mapping[str, str] | None = None,
    empty_note: str = "nothing was measured",
) -> str:
    """A line chart of `series` (or the no-data placeholder when no series has a point)."""
    xs = [x for s in series for x, _ in s.points] + [m.x for m in markers] + [b.x1 for b in bands]
    ys = [y for s in series for _, y in s.points]
    if not ys or not all(math.isfinite(v) for v in xs + ys):
        return empty_chart(name, title, empty_note, attrs)
    # The axes reach every bounded end of an error bar (an open end is only a stub).
    xs += _bounded_ends(e for s in series for e in s.x_errors)
    ys += _bounded_ends(e for s in series for e in s.y_errors)
    ys += [level.y for level in levels if math.isfinite(level.y)]
    x_axis = nice_axis(min(xs), max(xs), x_from_zero, 6)
    y_axis = nice_axis(min(ys), max(ys), True, 5)
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def px(x: float) -> float:
        return MARGIN_LEFT + x_axis.fraction(x) * plot_w

    def py(y: float) -> float:
        return MARGIN_TOP + (1 - y_axis.fraction(y)) * plot_h

    out: list[str] = [
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
        'preserveAspectRatio="xMidYMid meet">'
    ]
    for b in bands:
        x0, x1 = px(b.x0), px(b.x1)
        if b.shade:
            out.append(
                f'<rect class="band" x="{_f(x0)}" y="{MARGIN_TOP}" width="{_f(max(0.0, x1 - x0))}" height="{plot_h}"/>'
            )
        out.append(f'<text class="band-label" x="{_f(x0 + 4)}" y="{MARGIN_TOP + 11}">{escape(b.label)}</text>')
    y_step = y_axis.ticks[1] - y_axis.ticks[0] if len(y_axis.ticks) > 1 else 1.0
    x_step = x_axis.ticks[1] - x_axis.ticks[0] if len(x_axis.ticks) > 1 else 1.0
    for t in y_axis.ticks:
        y = py(t)
        out.append(f'<line class="grid" x1="{MARGIN_LEFT}" x2="{WIDTH - MARGIN_RIGHT}" y1="{_f(y)}" y2="{_f(y)}"/>')
        out.append(
            f'<text class="tick" x="{MARGIN_LEFT - 6}" y="{_f(y + 4)}" text-anchor="end">{tick_text(t, y_step)}</text>'
        )
    for t in x_axis.ticks:
        x = px(t)
        out.append(
            f'<line class="tick-mark" x1="{_f(x)}" x2="{_f(x)}" y1="{MARGIN_TOP + plot_h}" '
            f'y2="{MARGIN_TOP + plot_h + 4}"/>'
        )
        out.append(
            f'<text class="tick" x="{_f(x)}" y="{MARGIN_TOP + plot_h + 17}" text-anchor="middle">'
            f"{tick_text(t, x_step)}</text>"
        )
    out.append(
        f'<line class="axis" x1="{MARGIN_LEFT}" x2="{WIDTH - MARGIN_RIGHT}" y1="{MARGIN_TOP + plot_h}" '
        f'y2="{MARGIN_TOP + plot_h}"/>'
    )
    out.append(
        f'<line class="axis" x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT}" y1="{MARGIN_TOP}" y2="{MARGIN_TOP + plot_h}"/>'
    )
    out.append(
        f'<text class="axis-label" x="{MARGIN_LEFT + plot_w / 2:.1f}" y="{HEIGHT - 6}" '
        f'text-anchor="middle">{escape(x_label)}</text>'
    )
    out.append(
        f'<text class="axis-label" transform="translate(14 {MARGIN_TOP + plot_h / 2:.1f}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    for row, m in enumerate(markers):
        x = px(m.x)
        label_y = MARGIN_TOP + 12 + (row % 4) * 12
        near_right = x > WIDTH - MARGIN_RIGHT - 70
        label_x, anchor = (x - 3, ' text-anchor="end"') if near_right else (x + 3, "")
        cls = f"marker {escape(m.group)}".strip()
        dash = ' stroke-dasharray="4 3"' if m.dashed else ""
        out.append(
            f'<g class="{cls}"><title>{escape(m.label)}</title>'
            f'<line x1="{_f(x)}" x2="{_f(x)}" y1="{MARGIN_TOP}" y2="{MARGIN_TOP + plot_h}" '
            f'stroke="{escape(m.color)}"{dash}/>'
            f'<text class="marker-label" x="{_f(label_x)}" y="{label_y}" fill="{escape(m.color)}"{anchor}>'
            f"{escape(m.label)}</text></g>"
        )
    for level in levels:
        y = py(level.y)
        cls = f"level {escape(level.group)}".strip()
        out.append(
            f'<g class="{cls}"><title>{escape(level.label)}</title>'
            f'<line x1="{MARGIN_LEFT}" x2="{WIDTH - MARGIN_RIGHT}" y1="{_f(y)}" y2="{_f(y)}" '
            f'stroke="{escape(level.color)}" stroke-width="1.5" stroke-dasharray="2 3"/>'
            f'<text class="marker-label" x="{WIDTH - MARGIN_RIGHT - 3}" y="{_f(y - 4)}" text-anchor="end" '
            f'fill="{escape(level.color)}">{escape(level.label)}</text></g>'
        )
    for s in series:
        if not s.points:
            continue
        out.append(_series_svg(s, px, py, MARGIN_TOP + plot_h))
    out.append("</svg>")
    legend = _legend(series)
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return (
        f'<figure class="chart" data-chart="{escape(name)}"{_attrs(attrs or {})}>'
        f"<h3>{escape(title)}</h3>{''.join(out)}{legend}{cap}</figure>"
    )


def _bounded_ends(bars: Iterable[ErrorBar | None]) -> list[float]:
    ends: list[float] = []
    for e in bars:
        if e is not None:
            ends += [
                v for v, is_open in ((e.low, e.low_open), (e.high, e.high_open)) if not is_open and math.isfinite(v)
            ]
    return ends


def _error_bar_svg(at: float, centre: float, bar: ErrorBar, to_px: Callable[[float], float], vertical: bool) -> str:
    """One error bar through the point (`at` across the bar, `centre` along it, in px): a line
    to each bounded end with a cap, a dashed stub towards each open end."""
    parts: list[str] = []
    # Along a vertical bar, a larger value is higher on the screen: a smaller px.
    outward = -1.0 if vertical else 1.0
    for value, is_open, sign in ((bar.low, bar.low_open, -outward), (bar.high, bar.high_open, outward)):
        end = centre + sign * OPEN_STUB_PX if is_open else to_px(value)
        dash = ' stroke-dasharray="2 2"' if is_open else ""
        if vertical:
            parts.append(f'<line x1="{_f(at)}" x2="{_f(at)}" y1="{_f(centre)}" y2="{_f(end)}"{dash}/>')
            if not is_open:
                parts.append(f'<line x1="{_f(at - CAP_PX)}" x2="{_f(at + CAP_PX)}" y1="{_f(end)}" y2="{_f(end)}"/>')
        else:
            parts.append(f'<line x1="{_f(centre)}" x2="{_f(end)}" y1="{_f(at)}" y2="{_f(at)}"{dash}/>')
            if not is_open:
                parts.append(f'<line x1="{_f(end)}" x2="{_f(end)}" y1="{_f(at - CAP_PX)}" y2="{_f(at + CAP_PX)}"/>')
    return "".join(parts)


def _series_svg(s: Series, px: Callable[[float], float], py: Callable[[float], float], baseline: float) -> str:
    pts = [(px(x), py(y)) for x, y in s.points]
    if s.step:
        # Step-after: hold each y until the next x, then move to the next y.
        d = f"M{_f(pts[0][0])},{_f(pts[0][1])}" + "".join(f"H{_f(x)}V{_f(y)}" for x, y in pts[1:])
    else:
        d = "M" + "L".join(f"{_f(x)},{_f(y)}" for x, y in pts)
    parts = [f'<g class="{escape(("series " + s.group).strip())}" data-series="{escape(s.label)}">']
    if s.fill:
        parts.append(f'<path class="area" d="{d}V{_f(baseline)}H{_f(pts[0][0])}Z" fill="{escape(s.color)}"/>')
    dash = ' stroke-dasharray="6 4"' if s.dashed else ""
    if s.line:
        parts.append(f'<path class="line" d="{d}" stroke="{escape(s.color)}"{dash}/>')
    bars = [
        _error_bar_svg(x, y, e, py, vertical=True) for (x, y), e in zip(pts, s.y_errors, strict=False) if e is not None
    ] + [
        _error_bar_svg(y, x, e, px, vertical=False) for (x, y), e in zip(pts, s.x_errors, strict=False) if e is not None
    ]
    if bars:
        parts.append(f'<g class="error-bars" stroke="{escape(s.color)}">{"".join(bars)}</g>')
    for i, (x, y) in enumerate(pts):
        tip = f"<title>{escape(s.tooltips[i])}</title>" if i < len(s.tooltips) else ""
        if s.marker == "circle":
            parts.append(f'<circle cx="{_f(x)}" cy="{_f(y)}" r="4" fill="{escape(s.color)}">{tip}</circle>')
        elif s.marker == "square":
            parts.append(
                f'<rect x="{_f(x - 3.5)}" y="{_f(y - 3.5)}" width="7" height="7" '
                f'fill="#fff" stroke="{escape(s.color)}" stroke-width="2">{tip}</rect>'
            )
        if i < len(s.point_labels) and s.point_labels[i]:
            near_right = x > WIDTH - MARGIN_RIGHT - 50
            anchor = ' text-anchor="end"' if near_right else ""
            parts.append(
                f'<text class="point-label" x="{_f(x - 6 if near_right else x + 6)}" y="{_f(y - 8)}"'
                f"{anchor}>{escape(s.point_labels[i])}</text>"
            )
    parts.append("</g>")
    return "".join(parts)


def _legend(series: Sequence[Series]) -> str:
    seen: set[tuple[str, str, bool]] = set()
    items: list[str] = []
    for s in series:
        key = (s.label, s.color, s.dashed)
        if key in seen or not s.label:
            continue
        seen.add(key)
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        toggle = f' data-toggle="{escape(s.group)}"' if s.group else ""
        if s.line:
            swatch = f'<line x1="1" y1="5" x2="25" y2="5" stroke="{escape(s.color)}" stroke-width="2.5"{dash}/>'
        elif s.marker == "square":
            swatch = (
                f'<rect x="9.5" y="1.5" width="7" height="7" fill="#fff" stroke="{escape(s.color)}" stroke-width="2"/>'
            )
        else:
            swatch = f'<circle cx="13" cy="5" r="4" fill="{escape(s.color)}"/>'
        items.append(
            f'<span class="legend-item"{toggle}><svg width="26" height="10" aria-hidden="true">{swatch}</svg>'
            f"{escape(s.label)}</span>"
        )
    return f'<div class="legend">{"".join(items)}</div>' if items else ""
