"""Output an answer shows but Dubhe's count skipped: ``content`` as a list of parts (as
Mistral's API sends it, thinking chunks included) and the legacy ``function_call`` (the answer
to ``functions``, which Dubhe accepts). Both were 0 bytes of visible output, so the upstream's
honest usage failed the trust rule ("exceeds what 0 bytes can hold") and Dubhe charged its own
count of them: nothing. A client got the answer for the price of its prompt."""

from __future__ import annotations

from dubhe.usage import tokens
from dubhe.usage.reports import UsageReport, judge

TEXT = "The capital of France is Paris, a city of about two million people. " * 20
ARGUMENTS = '{"city": "Paris", "unit": "celsius", "days": 7}'


def answer(message: dict[str, object]) -> dict[str, object]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", **message}}]}


def test_content_parts_are_counted() -> None:
    data = answer({"content": [
        {"type": "thinking", "thinking": [{"type": "text", "text": TEXT}]},
        {"type": "text", "text": TEXT},
    ]})  # fmt: skip
    assert tokens.visible_output_bytes(data) >= 2 * len(TEXT)
    honest = tokens.count_completion_message(answer({"content": TEXT + TEXT}))
    assert tokens.count_completion_message(data) >= honest - 2
    report = UsageReport(prompt_tokens=20, completion_tokens=honest)
    assert judge(report, prompt_bound=100, visible_bytes=tokens.visible_output_bytes(data),
                 choices=1, output_limit=4096) is None  # fmt: skip


def test_a_legacy_function_call_is_counted() -> None:
    data = answer({"content": None, "function_call": {"name": "weather", "arguments": ARGUMENTS}})
    assert tokens.visible_output_bytes(data) == len("weather" + ARGUMENTS)
    assert tokens.count_completion_message(data) > 10


def test_a_stream_s_content_parts_are_counted() -> None:
    event = (b'data: {"choices":[{"index":0,"delta":{"content":[{"type":"text","text":"'
             + TEXT.encode() + b'"}]}}]}\n\n')  # fmt: skip
    counted, size = tokens.measure_completion_events(event)
    assert size == len(TEXT) and counted > 100
