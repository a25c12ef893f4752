"""Python launchers of the CUDA extension ``mobileops._C`` (kernels in ``csrc/``).

Each module mirrors its Triton counterpart in :mod:`mobileops.kernels` (same functions and
arguments), so the custom-op wiring in :mod:`mobileops.ops` serves both backends:

- :mod:`mobileops.cuda.dwconv_bn_act`: ``forward``, ``batch_stats``, ``backward``
- :mod:`mobileops.cuda.squeeze_excite`: ``forward``, ``backward``

They allocate outputs and workspaces with torch and call the binding with keyword arguments:
raw pointers, element strides, sizes, codes and the current stream. The ops in
:mod:`mobileops.ops` validate the user's tensors; the binding checks each argument it receives.
"""
