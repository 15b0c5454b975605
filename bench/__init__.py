"""Benchmarks: each script writes JSON to bench/results/; bench/render.py builds the README tables."""
