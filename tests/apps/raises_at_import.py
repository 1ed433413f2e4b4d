"""Raises while being imported."""

raise RuntimeError("explodes while importing raises_at_import")
