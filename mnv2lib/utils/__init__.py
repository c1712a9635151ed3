"""Utilities every layer may use: argument checks, paths, progress bars, atomic writes, provenance, the
allocator setting. They import nothing else of the package."""
