"""Monthly periods, anchored on the day a plan started (the 31st becomes the month's last day)."""

from __future__ import annotations

import calendar
from datetime import datetime


def add_months(moment: datetime, months: int = 1) -> datetime:
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def current_period(anchor_end: datetime, now: datetime) -> tuple[datetime, datetime]:
    """The period containing ``now`` in the chain of months that continues from ``anchor_end``."""
    start = anchor_end
    end = add_months(start)
    while end <= now:
        start, end = end, add_months(end)
    return start, end


def previous_period(start: datetime) -> tuple[datetime, datetime]:
    """The monthly period that ended when the one starting at ``start`` began."""
    return add_months(start, -1), start
