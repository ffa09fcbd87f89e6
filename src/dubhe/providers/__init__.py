"""Upstream model servers, one module per kind of upstream API.

``openai_compatible`` speaks the OpenAI chat-completions wire format (vLLM, Ollama, llama.cpp's
server, OpenAI, DeepSeek, DashScope and Dubhe's own simulator).
"""

from dubhe.providers.openai_compatible import Upstream, UpstreamPool

__all__ = ["Upstream", "UpstreamPool"]
