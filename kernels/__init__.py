"""Triton kernels of mobileops, shipped as ``mobileops.kernels``.

One module per fused op (the kernel and its launch helper); the autograd and custom-op wiring
lives in :mod:`mobileops.ops`, which registers each implementation with
:func:`mobileops.backend.register_impl`. No Triton kernel exists yet, so the ``triton``
backend reports "no fused op is implemented by this backend yet".
"""
