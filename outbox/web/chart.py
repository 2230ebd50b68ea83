"""The overview's picture: HTTP calls per minute over the last 24 hours as stacked bars, one
bar a minute (delivered at the bottom, then skipped, retried, failed on top), drawn as SVG
shapes the template writes out. Pure geometry: numbers in, rectangles and labels out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

from outbox.web.store import SERIES, Activity

WIDTH = 1520  # the viewBox; the page scales it to its width
HEIGHT = 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 252  # the plot area
# A failure is drawn at least this wide (viewBox units; a minute is about 1), so that one failed
# call among thousands of deliveries still shows.
FAILED_MIN_WIDTH = 4.0
COLOURS = {"delivered": "#2e7d32", "skipped": "#9e9e9e", "retry": "#f9a825", "failed": "#c62828"}
LABELS = {
    "delivered": "delivered",
    "skipped": "skipped (nothing to send)",
    "retry": "retried (tried again later)",
    "failed": "failed (needs a person)",
}

_WORDS = {"delivered": "delivered", "skipped": "skipped", "retry": "retried", "failed": "failed"}


@dataclass(frozen=True, slots=True)
class Series:
    """One series' bars as one SVG path (a rectangle a minute): a few elements for the page
    however busy the day was."""

    name: str
    colour: str
    path: str


@dataclass(frozen=True, slots=True)
class Tick:
    at: float
    label: str


@dataclass(frozen=True, slots=True)
class Legend:
    series: str
    label: str
    colour: str
    total: int


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    series: tuple[Series, ...]
    x_ticks: tuple[Tick, ...]
    y_ticks: tuple[Tick, ...]
    legend: tuple[Legend, ...]
    summary: str  # the chart said in words: its aria-label and <title>
    peak: int


def _nice_ceiling(value: int) -> int:
    """1, 2, 5, 10, 20, 50... at least `value`."""
    if value <= 1:
        return 1
    power = 10 ** math.floor(math.log10(value))
    return int(next(m * power for m in (1, 2, 5, 10) if m * power >= value))


def build(activity: Activity) -> Chart:
    minutes = len(activity.counts[SERIES[0]])
    totals = [sum(activity.counts[s][m] for s in SERIES) for m in range(minutes)]
    peak = max(totals, default=0)
    top = _nice_ceiling(peak)
    slot = (WIDTH - LEFT - RIGHT) / minutes
    scale = (BOTTOM - TOP) / top
    paths: dict[str, list[str]] = {s: [] for s in SERIES}
    for m in range(minutes):
        y = float(BOTTOM)
        for series in SERIES:
            count = activity.counts[series][m]
            if count:
                height = count * scale
                width = max(slot, FAILED_MIN_WIDTH) if series == "failed" else slot
                x = min(LEFT + m * slot, WIDTH - RIGHT - width)
                # From the bottom left corner: up, right, down, closed.
                paths[series].append(f"M{x:.2f} {y:.2f}v-{height:.2f}h{width:.2f}v{height:.2f}z")
                y -= height
    legend = tuple(Legend(s, LABELS[s], COLOURS[s], sum(activity.counts[s])) for s in SERIES)
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        left=LEFT,
        right=WIDTH - RIGHT,
        top=TOP,
        bottom=BOTTOM,
        series=tuple(Series(s, COLOURS[s], "".join(paths[s])) for s in SERIES if paths[s]),
        x_ticks=_x_ticks(activity, slot),
        y_ticks=tuple(Tick(BOTTOM - v * scale, f"{v:,}") for v in sorted({0, top // 2, top})),
        legend=legend,
        summary=_summary(legend, peak),
        peak=peak,
    )


def _x_ticks(activity: Activity, slot: float) -> tuple[Tick, ...]:
    """A label every 3 hours, on the hour (UTC), and `now` at the right end."""
    ticks = []
    first = activity.first
    hour = first.replace(minute=0) + timedelta(hours=1)
    while hour <= activity.last:
        if hour.hour % 3 == 0:
            offset = (hour - first).total_seconds() / 60
            ticks.append(Tick(LEFT + offset * slot, hour.strftime("%H:%M")))
        hour += timedelta(hours=1)
    return tuple(ticks)


def _summary(legend: tuple[Legend, ...], peak: int) -> str:
    parts = ", ".join(f"{item.total:,} {_WORDS[item.series]}" for item in legend)
    return (
        f"HTTP calls to Partnero per minute over the last 24 hours: {parts}; "
        f"at most {peak:,} in one minute"
    )
