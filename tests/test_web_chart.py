"""The overview's chart, as geometry: stacked bars a minute, in the plot area, a failure always
visible, axis labels on the hour, and the whole picture said in words for screen readers."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from outbox.web import chart
from outbox.web.store import CHART_MINUTES, SERIES, Activity


def activity(**per_minute: dict[int, int]) -> Activity:
    last = datetime(2026, 11, 30, 16, 20, tzinfo=UTC)
    counts = {s: [0] * CHART_MINUTES for s in SERIES}
    for series, minutes in per_minute.items():
        for minute, n in minutes.items():
            counts[series][minute] = n
    return Activity(last - timedelta(minutes=CHART_MINUTES - 1), last, counts, other=0)


def rectangles(path: str) -> list[tuple[float, float, float, float]]:
    """(x, bottom, width, height) of each `M x y v-h h w v h z`."""
    found = re.findall(r"M([\d.]+) ([\d.]+)v-([\d.]+)h([\d.]+)v[\d.]+z", path)
    return [(float(x), float(y), float(w), float(h)) for x, y, h, w in found]


def test_bars_stack_per_minute_inside_the_plot_area() -> None:
    drawn = chart.build(activity(delivered={0: 30, 100: 50}, retry={100: 20}, failed={1439: 1}))
    by_name = {s.name: s for s in drawn.series}
    assert list(by_name) == ["delivered", "retry", "failed"]  # skipped: nothing to draw
    assert drawn.peak == 70
    assert drawn.y_ticks[-1].label == "100"  # a round top above the peak
    delivered = rectangles(by_name["delivered"].path)
    retry = rectangles(by_name["retry"].path)
    assert len(delivered) == 2 and len(retry) == 1
    # The retries of minute 100 sit on its deliveries.
    (x, bottom, _, height) = delivered[1]
    assert retry[0][0] == x and abs(retry[0][1] - (bottom - height)) < 0.02
    for rect_x, rect_bottom, width, rect_height in delivered + retry:
        assert rect_x >= chart.LEFT and rect_x + width <= chart.WIDTH - chart.RIGHT + 0.01
        assert rect_bottom <= chart.BOTTOM and rect_bottom - rect_height >= chart.TOP - 0.01


def test_one_failure_among_many_deliveries_is_still_visible() -> None:
    busy = {m: 40 for m in range(CHART_MINUTES)}
    drawn = chart.build(activity(delivered=busy, failed={1439: 1}))
    (failed,) = [s for s in drawn.series if s.name == "failed"]
    ((x, _, width, height),) = rectangles(failed.path)
    assert width >= chart.FAILED_MIN_WIDTH and height > 0
    assert x + width <= chart.WIDTH - chart.RIGHT + 0.01


def test_labels_every_three_hours_and_a_summary_in_words() -> None:
    drawn = chart.build(activity(delivered={5: 2}, skipped={6: 1}, failed={7: 3}))
    assert [t.label for t in drawn.x_ticks] == [
        "18:00", "21:00", "00:00", "03:00", "06:00", "09:00", "12:00", "15:00"
    ]  # fmt: skip
    assert drawn.summary == (
        "HTTP calls to Partnero per minute over the last 24 hours: 2 delivered, 1 skipped, "
        "0 retried, 3 failed; at most 3 in one minute"
    )
    empty = chart.build(activity())
    assert empty.series == () and empty.peak == 0
