"""Clients for Dubhe's own protocols (the HTTP API is served to the unmodified OpenAI SDKs)."""
