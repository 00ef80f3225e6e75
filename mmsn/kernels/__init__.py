"""Triton kernels (imported only when used: the package works without triton)."""
