"""Thin stage drivers: each module exposes run(cfg) -> output path (config -> checks -> library -> output).
kdcache/schema.py declares every option once (below the library, which reads it); config.py resolves
defaults < YAML < flags. The drivers may import everything below them (kdcache.extract, kdcache.train, the
library); only the CLI, the demo and the benchmarks import the drivers."""
