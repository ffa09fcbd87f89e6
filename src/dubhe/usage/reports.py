"""What an upstream says it used, and the one rule for when Dubhe believes it.

An upstream's ``usage`` object is outside data: it is parsed once, at the provider boundary, into a
``UsageReport`` of non-negative integers, or refused with the reason. A parsed report is then
charged in full only if it is physically possible for this request:

- ``prompt_tokens`` at most the prompt's bound (the number admission held for the prompt: no
  tokenizer produces more tokens than that bound allows for);
- ``completion_tokens`` minus the reported hidden reasoning tokens at most the UTF-8 bytes of the
  visible output the upstream sent (content, as a string or as parts, reasoning_content, refusal,
  tool-call and legacy function-call names and arguments) plus ``OVERHEAD_PER_CHOICE`` per
  choice: a byte-level tokenizer never makes more than one token per byte, and the overhead covers the few special tokens (end of turn, tool-call markers)
  that generate no visible text;
- hidden reasoning tokens, and all completion tokens, at most the output limit held for the
  request (what the upstream was told it may generate, over all choices). When only this last
  check fails, the reported prompt count (which passed its own) is kept and Dubhe counts the
  output itself.

Anything else (no usage, partial usage such as only ``total_tokens``, zeros with output, negative,
fractional, strings, impossibly large) is replaced by Dubhe's own count of what was exchanged, and
the record is marked estimated with the reason logged.
"""

from __future__ import annotations

from typing import Any

from dubhe.immutable import immutable

# Special tokens a choice may generate without visible text: end of turn, a tool-call wrapper.
OVERHEAD_PER_CHOICE = 16
# No token of any tokenizer, nor an honest stream's event per token with its framing and log
# probabilities, carries this many bytes: a count that leaves more per token is too low.
MAX_BYTES_PER_TOKEN = 4096
# Above this no count is a token count (it would not fit a signed 64-bit database column).
_MAX_COUNT = 2**53


@immutable
class UsageReport:
    """An upstream's counts, checked to be non-negative integers."""

    prompt_tokens: int
    completion_tokens: int
    hidden_reasoning_tokens: int = 0


@immutable
class Untrusted:
    """Why an upstream's usage was not charged as reported."""

    reason: str
    # The reported prompt count, kept when it passed its own check and only the completion count
    # was refused for exceeding the output limit the upstream was sent.
    prompt_tokens: int | None = None


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_COUNT:
        return value
    return None


def parse_usage(value: Any) -> UsageReport | Untrusted:
    """The ``usage`` object of an answer or a stream's usage chunk, parsed once."""
    if value is None:
        return Untrusted("no usage reported")
    if not isinstance(value, dict):
        return Untrusted(f"usage is a {type(value).__name__}, not an object")
    prompt = _count(value.get("prompt_tokens"))
    completion = _count(value.get("completion_tokens"))
    if prompt is None or completion is None:
        return Untrusted(
            "usage counts are missing or not non-negative integers "
            f"(prompt_tokens={value.get('prompt_tokens')!r:.40}, "
            f"completion_tokens={value.get('completion_tokens')!r:.40})"
        )
    hidden = 0
    details = value.get("completion_tokens_details")
    if isinstance(details, dict) and details.get("reasoning_tokens") is not None:
        reasoning = _count(details.get("reasoning_tokens"))
        if reasoning is None or reasoning > completion:
            return Untrusted(
                f"reasoning_tokens={details.get('reasoning_tokens')!r:.40} is not a count "
                "within completion_tokens"
            )
        hidden = reasoning
    return UsageReport(prompt, completion, hidden)


def judge(
    report: UsageReport,
    *,
    prompt_bound: int,
    visible_bytes: int,
    choices: int,
    output_limit: int,
) -> Untrusted | None:
    """None when the report is physically possible for this request; else why not."""
    if report.prompt_tokens > prompt_bound:
        return Untrusted(f"prompt_tokens {report.prompt_tokens} exceeds the prompt's bound {prompt_bound}")
    if report.prompt_tokens == 0 and prompt_bound > 0:
        return Untrusted("prompt_tokens is 0 for a non-empty prompt")
    visible = report.completion_tokens - report.hidden_reasoning_tokens
    if visible > visible_bytes + OVERHEAD_PER_CHOICE * choices:
        return Untrusted(
            f"completion_tokens {report.completion_tokens} exceeds what {visible_bytes} bytes "
            "of visible output can hold"
        )
    if visible == 0 and visible_bytes > 0:
        return Untrusted(f"completion_tokens is 0 for {visible_bytes} bytes of output")
    # All of completion_tokens, hidden reasoning included: a reasoning text the upstream did
    # show (reasoning_content) is in visible_bytes while its tokens may be counted as hidden.
    if report.completion_tokens * MAX_BYTES_PER_TOKEN < visible_bytes:
        return Untrusted(
            f"completion_tokens {report.completion_tokens} is too few for {visible_bytes} "
            "bytes of visible output"
        )
    if report.hidden_reasoning_tokens > output_limit:
        return Untrusted(
            f"{report.hidden_reasoning_tokens} hidden reasoning tokens exceed the output limit "
            f"{output_limit}"
        )
    if report.completion_tokens > output_limit:
        # Within what the output's bytes could hold, but more than the upstream was told it may
        # generate: it over-reports, or it ignored the limit. Either way Dubhe counts the output
        # it relayed (an upstream that really ignored its limit is still paid for all of it).
        return Untrusted(
            f"completion_tokens {report.completion_tokens} exceed the output limit "
            f"{output_limit} the upstream was sent",
            prompt_tokens=report.prompt_tokens,
        )
    return None
