"""Simulated data: ``scenes`` (scenes, kernels, image pairs) and ``demo`` (the demo stack and job)."""
