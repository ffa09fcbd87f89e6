"""``dubhe upstream-sim``: a fast, deterministic OpenAI-compatible upstream.

It is the fixture for the gateway's tests, the benchmark baseline and the demo
backend. Endpoints:

* ``POST /v1/chat/completions`` — streamed or not, echoing ``model``. The answer
  is 16 tokens ("Lorem ipsum dolor ..."; each token is exactly one cl100k token),
  cut to ``max_completion_tokens``/``max_tokens`` with finish_reason "length".
  With a non-empty ``tools`` list (and tool_choice not "none") it answers one call
  to the first function, or the one tool_choice names, with dummy arguments.
  Usage is exact: prompt = 3 per message + cl100k tokens of its text content + 3.
* ``GET /v1/models`` — a couple of dummy models.
* ``GET /sim/stats`` / ``POST /sim/reset`` — request counters for tests
  (``reset`` keeps ``active``, which counts requests still in flight).

Directives anywhere in the last user message's text (they combine):

* ``[[sim:tokens=N]]`` — answer with N tokens (0 allowed).
* ``[[sim:status=NNN]]`` — a 4xx/5xx OpenAI error envelope instead of an answer.
* ``[[sim:delay_ms=N]]`` — wait N ms before the response starts.
* ``[[sim:cut_after=N]]`` — drop the connection mid-response. Streams deliver their
  first N SSE events (role chunk = #1, then one per token or tool-argument
  fragment, the finish chunk, the usage chunk if requested, ``[DONE]``) and never
  send the terminating chunk. Non-stream responses announce the full
  content-length and deliver half of the body.
"""

from dubhe.sim._app import UpstreamSimulator, create_app
from dubhe.sim._server import serve

__all__ = ["UpstreamSimulator", "create_app", "serve"]
