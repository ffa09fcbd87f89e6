"""Upstream model servers, one module per kind of upstream API.

``pool`` holds the deployments. An OpenAI-compatible upstream (vLLM, Ollama, llama.cpp's server,
OpenAI, DeepSeek, DashScope and Dubhe's own simulator) speaks the wire format Dubhe relays, so its
answers pass through as they are; ``anthropic`` translates Anthropic's Messages API to and from it.
"""

from dubhe.providers.pool import Upstream, UpstreamPool

__all__ = ["Upstream", "UpstreamPool"]
