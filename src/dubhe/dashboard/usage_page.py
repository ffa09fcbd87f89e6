"""What ``/dashboard/usage`` shows: a period's usage per day (as charts), per model and per key,
with the other period's totals beside it, and the latest requests."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.billing.pricing import UUSD_PER_CENT
from dubhe.billing.queries import (
    BillingQueries,
    KeyUsage,
    ModelTotal,
    UsageBucket,
    totals_by_model,
    usage_summary,
)
from dubhe.catalog import Catalog
from dubhe.dashboard.charts import Chart, daily_stacked_chart, series_colors
from dubhe.dashboard.templating import tokens, usd
from dubhe.models import UsageRecord

RECENT_REQUESTS = 50


@dataclass(frozen=True, slots=True)
class Totals:
    requests: int
    tokens: int
    cost_uusd: int


@dataclass(frozen=True, slots=True)
class UsagePage:
    period: str  # current | previous
    period_start: datetime
    period_end: datetime
    totals: Totals
    other_totals: Totals
    token_chart: Chart
    cost_chart: Chart
    models: list[ModelTotal]
    keys: list[KeyUsage]
    requests: list[UsageRecord]
    next_before: int | None


async def build_usage_page(session: AsyncSession, *, user_id: int, catalog: Catalog,
                           now: datetime, period: str, before: int | None) -> UsagePage:
    previous = period == "previous"
    shown = await usage_summary(session, user_id=user_id, catalog=catalog, now=now,
                                previous=previous)
    other = await usage_summary(session, user_id=user_id, catalog=catalog, now=now,
                                previous=not previous)
    days = _days(shown.period_start, shown.period_end)
    colors = series_colors(sorted({bucket.model for bucket in shown.days} | set(catalog.models)))
    token_values: dict[date, dict[str, int]] = defaultdict(dict)
    cost_values: dict[date, dict[str, int]] = defaultdict(dict)
    for bucket in shown.days:
        token_values[bucket.day][bucket.model] = bucket.prompt_tokens + bucket.completion_tokens
        cost_values[bucket.day][bucket.model] = bucket.cost_uusd
    requests, next_before = await BillingQueries.from_session(session).requests_page(
        user_id, limit=RECENT_REQUESTS, before=before)
    return UsagePage(
        period="previous" if previous else "current",
        period_start=shown.period_start, period_end=shown.period_end,
        totals=_totals(shown.days), other_totals=_totals(other.days),
        token_chart=daily_stacked_chart(chart_id="tokens-chart", title="Tokens per day",
                                        days=days, values=token_values, colors=colors,
                                        format_value=tokens, smallest_scale=100),
        cost_chart=daily_stacked_chart(chart_id="cost-chart", title="Cost per day", days=days,
                                       values=cost_values, colors=colors, format_value=usd,
                                       smallest_scale=UUSD_PER_CENT),
        models=totals_by_model(shown.days), keys=shown.keys, requests=requests,
        next_before=next_before,
    )


def _days(start: datetime, end: datetime) -> list[date]:
    first, last = start.date(), (end - timedelta(microseconds=1)).date()
    return [first + timedelta(days=offset) for offset in range((last - first).days + 1)]


def _totals(buckets: list[UsageBucket]) -> Totals:
    return Totals(requests=sum(b.requests for b in buckets),
                  tokens=sum(b.prompt_tokens + b.completion_tokens for b in buckets),
                  cost_uusd=sum(b.cost_uusd for b in buckets))
