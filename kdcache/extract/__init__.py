"""Extraction as a library, below the stage driver: the teacher and what the cache records about it
(teacher), the cache it writes into (output: create, open, clear, repair) and the work split of a job array
and its ranks (work). The teacher pass itself is kdcache.extraction. May import the library (store,
datasets, teachers, views, heads, dist, options); never kdcache.stages, kdcache.train or the CLI."""
