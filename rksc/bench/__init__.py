"""Benchmark problems: loaders for public evaluation sets shipped inside PyPI packages."""
