"""Running work: Ray start-up and actor pools, batching with prefetch, progress bars."""
