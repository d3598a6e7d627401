"""HTTP server: `paradecode serve` (FastAPI + uvicorn)."""

from .app import create_app

__all__ = ["create_app"]
