"""The kit's own tests run pytest sessions of their own (pytester) for the plugin and the docs."""

from __future__ import annotations

pytest_plugins = ["pytester"]
