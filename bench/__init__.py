"""Benchmarks of the subspax optimizers; run each as `python -m bench.<name>`."""
