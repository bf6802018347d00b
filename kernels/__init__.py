"""Triton kernels of gopd-fast, installed as ``gopd_fast.kernels``."""
