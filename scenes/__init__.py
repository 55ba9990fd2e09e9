"""Scenes the project generates itself (the embedded default)."""
