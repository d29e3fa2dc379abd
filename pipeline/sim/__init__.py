"""Simulated data: ``scenes`` (scenes, kernels, image pairs), ``defects`` (bad pixels, saturation, cosmic
rays injected into a pair) and ``demo`` (the demo stack and job)."""
