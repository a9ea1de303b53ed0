"""The teacher cache: its format, metadata, storage, integrity records and derived data.

Owns everything about the Zarr store and nothing about what fills it. Layers, each importing only those
before it: format (ARRAYS, Layout, CacheError) and backend (local disks and object storage), meta
(the root attributes), integrity (checksums, digests, checks), store (CacheStore), derived (derived
groups). The package imports kdcache.codes and nothing else of kdcache.
"""
