"""Python launchers of the CUDA extension ``mobileops._C`` (kernels in ``csrc/``).

Each module mirrors its Triton counterpart in :mod:`mobileops.kernels` (same functions and
arguments), so the custom-op wiring in :mod:`mobileops.ops` serves both backends:

- :mod:`mobileops.cuda.dwconv_bn_act`: ``forward``, ``batch_stats``, ``backward``
- :mod:`mobileops.cuda.squeeze_excite`: ``forward``, ``backward``

They allocate outputs and workspaces with torch, check every tensor (device, dtype, shape)
before a launch, and pass raw pointers, element strides and the current stream.
"""
