"""Process-level helpers: atomic writes, devices, the allocator, threads, progress reports."""
