"""The HTTP API (``/api/v1``): routers, and the dependencies every route goes through."""

from fleet_server.api.deps import Principal, require_role

__all__ = ["Principal", "require_role"]
