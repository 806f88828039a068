"""API routes: bundles (being built)."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["download_router", "router"]

router = APIRouter()
download_router = APIRouter()
