"""Training a student from a cache: what a run reads (inputs: the trainable cache, its scenario, the student
and method), the stream (loader), the epoch loop (engine), the run folder (run_dir: lock, naming, resume,
checkpoints, metrics) and one run put together (session). May import the library (store, scenarios,
methods, students, derived, ...) and kdcache.options; never kdcache.stages or the CLI."""
