"""The step's speed on a CPU: threaded gradient accumulation, its measurement, the allocator's settings."""
