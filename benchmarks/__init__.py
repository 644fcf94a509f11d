"""Benchmarks of the losses library (`make bench`); timings are ratios measured in one process."""
