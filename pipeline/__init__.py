"""kdcache library: datasets, packing, views, teachers, the Zarr cache, and (stage two) students."""
__version__ = "0.1.0"
