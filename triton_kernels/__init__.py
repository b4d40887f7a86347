"""Triton kernels of fusedrnn (installed as fusedrnn.triton_kernels)."""
