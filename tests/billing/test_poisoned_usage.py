"""One bad usage record never blocks the others, the flush, the sweeper or shutdown.

Counts that are not token counts are replaced by Dubhe's own count before they touch a lease.
Records on disk are checked before any SQL; one the database refuses anyway (here a key that
does not exist, which only the database knows) is found by splitting its batch, and set aside in
the dead-letter file with an ERROR line, while the rest are written.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from sqlalchemy import text

from dubhe.billing.pricing import cost_uusd
from dubhe.models.base import utcnow
from tests.billing.conftest import Billing, Ledger, admit, event
from tests.conftest import wait_for_row


async def test_counts_that_are_not_counts_are_counted_instead(ledger: Ledger) -> None:
    user_id = await ledger.user("metered")
    await ledger.credit(user_id, 1_000_000)
    meter = ledger.meter()
    bad_counts: list[Any] = [-1000, 10.5, True, "12", 2**70]
    request_ids = []
    try:
        for bad in bad_counts:
            request_id, _ = await admit(meter, user_id)
            usage = event(user_id, request_id, 10, 0)
            usage.completion_tokens = bad
            usage.messages = [{"role": "user", "content": "hello"}]
            usage.response = {"choices": [{"message": {"role": "assistant", "content": "hi"}}]}
            settled = meter.settle(usage, wait=True)
            assert settled is not None and settled.cost_uusd >= 0
            request_ids.append(request_id)
        # A good request after them is served and written like any other.
        request_id, _ = await admit(meter, user_id)
        assert meter.settle(event(user_id, request_id, 10, 5), wait=True) is not None
        await meter.flush()
    finally:
        await meter.stop()  # would raise if a record were stuck
    async with ledger.engine.connect() as connection:
        rows = (await connection.execute(
            text("SELECT request_id, completion_tokens, usage_source FROM usage_records "
                 "WHERE user_id = :u"), {"u": user_id})).all()
    sources = {row[0]: (row[1], row[2]) for row in rows}
    for bad_id in request_ids:
        completion, source = sources[bad_id]
        assert source == "estimated" and 0 <= completion < 100
    assert sources[request_id] == (5, "upstream")
    assert meter.dead_letters == 0
    await ledger.assert_reconciled(user_id)


def usage_record(user_id: int, **fields: Any) -> dict[str, Any]:
    """A settled-usage record as a worker spools it (its lease long gone)."""
    return {
        "request_id": "spooled-" + secrets.token_hex(6), "user_id": user_id, "api_key_id": None,
        "lease_id": 0, "model": "dubhe-fast", "upstream": "fast", "stream": False,
        "prompt_tokens": 10, "completion_tokens": 20, "usage_source": "upstream",
        "outcome": "ok", "status_code": 200, "latency_ms": 5,
        "created_at": utcnow().isoformat(), "tokens_used": 0, "uusd_used": 0, **fields,
    }


async def test_a_poisoned_spool_is_replayed_around_its_bad_records(billing: Billing) -> None:
    key, user_id = await billing.new_account("metered")
    await billing.credit(user_id, 1_000_000)
    good = [usage_record(user_id), usage_record(user_id, completion_tokens=7)]
    poisoned = [
        usage_record(user_id, prompt_tokens=-1000),  # would create credit
        usage_record(user_id, completion_tokens=10.5),  # would turn counters into floats
        usage_record(user_id, completion_tokens="20"),
        usage_record(user_id, tokens_used=10**6),  # charges more than it used
        usage_record(user_id, api_key_id=2**40),  # passes every check; the database refuses it
    ]
    # A dead worker's spool: a lock file nobody holds, and its records, bad ones among good.
    spool = billing.server.data_dir / "spool"
    owner = f"dead-host-1-{secrets.token_hex(3)}"
    lines = [orjson.dumps(record) for record in (good[0], *poisoned, good[1])]
    lines += [b"[1, 2]", b'{"cut in the middle of its wr']
    (spool / f"{owner}.00000001.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (spool / f"{owner}.lock").touch()

    for record in good:  # the sweeper replays it within a second
        row = await wait_for_row(billing.engine, "SELECT * FROM usage_records WHERE request_id = :r",
                                 timeout=15, r=record["request_id"])
        assert row is not None, "the good records of the spool were not written"
        model = billing.catalog.models["dubhe-fast"]
        assert row["cost_uusd"] == cost_uusd(model, 10, record["completion_tokens"])
    dead_letters = await _dead_letters(spool, len(poisoned) + 1)
    assert sorted(entry["record"]["request_id"] for entry in dead_letters
                  if isinstance(entry["record"], dict)) == sorted(r["request_id"] for r in poisoned)
    assert any("refused" in entry["reason"] for entry in dead_letters)
    assert not list(spool.glob(f"{owner}*")), "the replayed spool was not removed"
    async with billing.engine.connect() as connection:
        for record in poisoned:
            found = await connection.execute(
                text("SELECT count(*) FROM ledger_entries WHERE ref = :r"),
                {"r": record["request_id"]})
            assert found.scalar_one() == 0
    assert "set aside" in billing.server.running.log.read_text()

    # The worker goes on serving, recording and settling: nothing is stuck behind the bad records.
    response = httpx.post(
        billing.server.base_url + "/chat/completions",
        json={"model": "dubhe-fast", "messages": [{"role": "user", "content": "still fine?"}]},
        headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == 200
    assert await wait_for_row(billing.engine, "SELECT id FROM usage_records WHERE request_id = :r",
                              r=response.headers["x-request-id"]) is not None
    account = await billing.assert_consistent(user_id)
    async with billing.engine.connect() as connection:
        charged = (await connection.execute(
            text("SELECT sum(cost_uusd) FROM usage_records WHERE user_id = :u"), {"u": user_id}
        )).scalar_one()
    assert account["balance_uusd"] == 1_000_000 - charged


async def _dead_letters(spool: Path, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while True:
        entries = [orjson.loads(line) for path in (spool / "dead-letter").glob("*.jsonl")
                   for line in path.read_bytes().splitlines()] if (spool / "dead-letter").exists() else []
        if len(entries) >= count or time.monotonic() > deadline:
            assert len(entries) == count, entries
            return entries
        await asyncio.sleep(0.1)
