"""Everything outside ``/v1``: the JSON API under ``/api`` (and, later, the dashboard).

FastAPI is fine here: these routes are not the hot path. The application is built at startup from
the worker's shared state (``WebState``), which routes reach through typed dependencies.
"""

from dubhe.web.app import create_web_app
from dubhe.web.dependencies import WebState

__all__ = ["WebState", "create_web_app"]
