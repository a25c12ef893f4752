"""The integer codes the kernels use for activations, gates, BatchNorm modes and dtypes.

This table is the single source of the codes. The Triton kernels (``kernels/``) and the CUDA
launchers (``mobileops/cuda/``) read them from here. The CUDA extension has its own C++
enums (``csrc/ops.h``) and exports their values through ``mobileops._C.codes()``; a test
checks that they match this table (``tests/test_cuda_emulated.py``, which builds csrc/ for
the CPU). Add a code here and in ``csrc/ops.h`` together.
"""

from __future__ import annotations

#: Elementwise activation after the norm, and SE's gate (hsigmoid, sigmoid) and post-activation.
ACTIVATION_CODES = {"none": 0, "relu": 1, "relu6": 2, "hswish": 3, "silu": 4, "hsigmoid": 5, "sigmoid": 6}

#: What the BatchNorm step of ``dwconv_bn_act`` does: nothing (``dwconv_act``), running
#: statistics (inference), batch statistics (training).
NORM_CODES = {"none": 0, "running": 1, "batch": 2}

#: Activation dtypes of the CUDA extension, by ``torch.dtype`` name.
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}

__all__ = ["ACTIVATION_CODES", "DTYPE_CODES", "NORM_CODES"]
