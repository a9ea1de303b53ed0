"""Training a student from a cache: what a run reads (inputs: the trainable cache, its scenario, the student
and method), the stream (loader), the epoch loop and the checkpoint and metrics files (engine), the run folder (run_dir:
lock, naming, resume checks, what each epoch saves) and one run put together (session). May import the
library (cache, scenarios, methods, students, ...) and kdcache.options; never kdcache.stages or the CLI."""
