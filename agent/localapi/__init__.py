"""The local inference API (HTTP/1.1 over a Unix socket) and its Python client.

Only the client is imported eagerly: an app that calls the agent should not load the runtime stack.
"""

from agent.localapi.client import LocalApiError, LocalClient

__all__ = ["LocalApiError", "LocalClient"]
