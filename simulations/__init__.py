"""Runnable simulations and benchmarks of fedlora."""
