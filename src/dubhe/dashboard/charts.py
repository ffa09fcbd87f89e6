"""Server-rendered SVG charts: daily stacked bars, drawn from integer series.

The page needs no JavaScript and no chart library to show them. Values stay integers (tokens,
micro-dollars) up to the last step, where they become pixel positions; labels are formatted by
the caller's function from the integers, so money never passes through a float on its way to text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date

# Distinguishable on white and from each other; assigned to series in a stable order.
PALETTE = ("#1d4ed8", "#b45309", "#047857", "#7c3aed", "#be123c", "#0e7490", "#4d7c0f", "#86198f")

WIDTH, HEIGHT = 960, 260
LEFT, RIGHT, TOP, BOTTOM = 84, 8, 14, 30


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    color: str
    label: str  # shown as the bar's tooltip: "2026-12-01, dubhe-fast: 1,234 tokens"


@dataclass(frozen=True, slots=True)
class Tick:
    position: float
    text: str


@dataclass(frozen=True, slots=True)
class Chart:
    id: str
    title: str
    summary: str  # what a screen reader hears instead of the picture
    width: int
    height: int
    bars: list[Bar]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    legend: list[tuple[str, str]]  # (colour, series name)
    plot_left: int
    plot_right: int
    plot_bottom: int


def series_colors(names: Sequence[str]) -> dict[str, str]:
    return {name: PALETTE[index % len(PALETTE)] for index, name in enumerate(sorted(names))}


def nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``value`` (at least 1)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def daily_stacked_chart(
    *,
    chart_id: str,
    title: str,
    days: Sequence[date],
    values: Mapping[date, Mapping[str, int]],
    colors: Mapping[str, str],
    format_value: Callable[[int], str],
    smallest_scale: int = 1,
) -> Chart:
    """One bar per day, stacked by series (a model), scaled to a round maximum (at least
    ``smallest_scale``, so an empty chart still has sensible axis labels)."""
    totals = [sum(values.get(day, {}).values()) for day in days]
    top = nice_ceiling(max([*totals, smallest_scale]))
    plot_width = WIDTH - LEFT - RIGHT
    plot_height = HEIGHT - TOP - BOTTOM
    slot = plot_width / max(len(days), 1)
    bar_width = max(slot * 0.7, 1.0)
    bars: list[Bar] = []
    for index, day in enumerate(days):
        base = 0
        for name in sorted(values.get(day, {})):
            amount = values[day][name]
            if amount <= 0:
                continue
            y_top = TOP + plot_height * (1 - (base + amount) / top)
            height = plot_height * amount / top
            bars.append(Bar(x=LEFT + index * slot + (slot - bar_width) / 2, y=y_top,
                            width=bar_width, height=max(height, 0.5), color=colors[name],
                            label=f"{day.isoformat()}, {name}: {format_value(amount)}"))
            base += amount
    label_every = max(1, len(days) // 6)
    x_ticks = [Tick(position=LEFT + index * slot + slot / 2, text=day.strftime("%b %d"))
               for index, day in enumerate(days) if index % label_every == 0]
    y_ticks = [Tick(position=TOP + plot_height * (1 - fraction / 2), text=format_value(top * fraction // 2))
               for fraction in (0, 1, 2)]
    total = sum(totals)
    busiest = max(range(len(days)), key=lambda i: totals[i], default=None)
    if total == 0 or busiest is None:
        summary = f"{title}: nothing yet in this period."
    else:
        summary = (f"{title}: {format_value(total)} in total over {len(days)} days; the most on "
                   f"{days[busiest].isoformat()} ({format_value(totals[busiest])}).")
    present = sorted({name for day in days for name in values.get(day, {})})
    return Chart(id=chart_id, title=title, summary=summary, width=WIDTH, height=HEIGHT, bars=bars,
                 x_ticks=x_ticks, y_ticks=y_ticks,
                 legend=[(colors[name], name) for name in present],
                 plot_left=LEFT, plot_right=WIDTH - RIGHT, plot_bottom=HEIGHT - BOTTOM)
