"""Over HTTP too (the root cause of test_ws.py's ``test_a_cancel_sent_on_the_last_chunk_...`` is
shared): a streaming client that hangs up the moment it reads the ``finish_reason`` chunk pays
nothing for the answer when the upstream reports no usage in its stream (many do not).

The settlement made when the stream ends (``ChatCompletion._events`` -> ``_settle_stream`` ->
``StreamRelay.measured``) empties the relay's last batch and counts it in a thread; the client's
disconnect cancels the task there (``_Exchange.finishing`` is set only after the stream's
settlement), and ``abandon()`` counts again from the emptied batch: every token after the last
full 1 MiB batch is dropped. An answer under 1 MiB of events (about 6,000 tokens) is charged
0 completion tokens; a longer one loses its last mebibyte. Deterministic here: 3,000 tokens
received, 0 billed, on every attempt. Upstream cost per request stays with the operator.

Fix: ``StreamRelay.measured`` keeps its batch until its count is done (or caches the pending
count so a second call awaits the same future), and the end-of-stream settlement is shielded
from the consumer's cancellation (``finishing``/"shielded" set once the upstream's stream ended).
Fails on 910dad1 (branch ws)."""

from __future__ import annotations

import httpx

from tests.conftest import wait_for_row
from tests.upstreams.realistic import Realistic
from tests.ws.conftest import WsBilling


async def test_hanging_up_on_the_finish_chunk_does_not_make_the_answer_free(
    ws: WsBilling, realistic: Realistic
) -> None:
    key, user_id = await ws.new_account("roomy")
    short: list[tuple[int, int, str]] = []
    async with httpx.AsyncClient(base_url=ws.server.base_url, timeout=60,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        for attempt in range(3):
            body = {"model": "dubhe-qwen", "stream": True, "max_tokens": 3000,
                    "messages": [{"role": "user",
                                  "content": "x [[up:tokens=3000]] [[up:usage=none]]"}]}
            async with client.stream("POST", "/chat/completions", json=body) as response:
                assert response.status_code == 200
                request_id = response.headers["x-request-id"]
                async for line in response.aiter_lines():
                    if '"finish_reason":"' in line:
                        break  # every token is here: hang up before [DONE]
            generated = realistic.charged(request_id)
            assert generated is not None and generated["completion_tokens"] == 3000
            record = await wait_for_row(ws.engine,
                                        "SELECT * FROM usage_records WHERE request_id = :r",
                                        timeout=10, r=request_id)
            assert record is not None
            if record["completion_tokens"] < 3000:
                short.append((attempt, record["completion_tokens"], record["outcome"]))
    assert not short, f"received 3,000 tokens, billed fewer: {short}"
    await ws.assert_consistent(user_id)
