"""kdcache: run a vision teacher once into a Zarr cache, then distil edge students from it.

The library (datasets, packing, views, teachers, the cache, students, methods) sits in this package's
modules; extraction below its stage in `kdcache.extract`, training in `kdcache.train`; the three stages
(extract, distill, evaluate) and the demo in `kdcache.stages`; the command line in `kdcache.cli` (the
`kdcache` console script). Imports point down: cli -> stages -> extract, train -> methods, library ->
options, registry.
"""
__version__ = "0.1.0"
