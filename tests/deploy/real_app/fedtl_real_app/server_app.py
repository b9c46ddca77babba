"""The production ServerApp, unchanged: the coordinator reads ``config-file``, ``run-dir``,
``cache-dir`` and ``resume`` from the run config."""

from __future__ import annotations

from server.server_app import app

__all__ = ["app"]
