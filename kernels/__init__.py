"""Triton kernels of mobileops, shipped as ``mobileops.kernels``.

One module per fused op (the kernels and their launch helpers); the autograd and custom-op
wiring lives in :mod:`mobileops.ops`, which registers each implementation with
:func:`mobileops.backend.register_impl` and imports these modules on first use (Triton decides
when a kernel is defined whether ``TRITON_INTERPRET=1`` makes it run in the CPU interpreter).

=================  =============================================================
module             ops
=================  =============================================================
dwconv_bn_act      ``dwconv_bn_act``, ``dwconv_act`` and (without the conv)
                   ``bn_act``: forward, batch statistics, backward
squeeze_excite     ``squeeze_excite``: pool, per-sample MLP, rescale; backward
_common            activations, tile coordinates, row sums, launch plumbing
=================  =============================================================
"""
