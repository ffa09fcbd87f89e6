"""Static assets (the stylesheet and the pages' scripts), served with cache headers.

Pages link them through ``static_url``, which adds a content hash, so a versioned URL may be cached
for a year: a changed file gets a new URL. An unversioned request is cached for an hour.
"""

from __future__ import annotations

import os

from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from dubhe.dashboard.templating import STATIC_DIR

VERSIONED_CACHE = "public, max-age=31536000, immutable"
UNVERSIONED_CACHE = "public, max-age=3600"


class CachedStaticFiles(StaticFiles):
    def file_response(
        self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        versioned = b"v=" in scope.get("query_string", b"")
        response.headers["cache-control"] = VERSIONED_CACHE if versioned else UNVERSIONED_CACHE
        return response


def static_files() -> CachedStaticFiles:
    return CachedStaticFiles(directory=STATIC_DIR)
