"""Triton kernels and their host launchers, installed as ``fastmodels.kernels``.

Kernel modules import only torch, triton and the standard library (never ``fastmodels``).
"""
