"""Triton kernels of mobileops, shipped as ``mobileops.kernels``.

One module per fused op (kernel plus launch helper); the autograd and custom-op wiring
lives in :mod:`mobileops.ops`. No Triton kernel is implemented yet, so the ``triton``
backend reports itself unavailable.
"""

#: Fused ops that have a Triton implementation in this package.
IMPLEMENTED_OPS: tuple = ()
