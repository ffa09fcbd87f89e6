"""Test upstreams: OpenAI-compatible servers that behave like hostile or realistic model servers.

They live in the tests, not in the product: the product's own simulator (``dubhe upstream-sim``)
is for demos and the benchmark; these exist to attack the gateway.
"""
