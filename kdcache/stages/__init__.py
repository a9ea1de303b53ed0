"""Thin stage drivers: each module exposes run(cfg) -> output path."""
