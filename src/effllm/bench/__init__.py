"""Benchmarks: measured speed and memory, peers run side by side, JSON out."""
