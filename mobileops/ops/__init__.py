"""Fused ops: one public function each, dispatched to a backend (see :mod:`mobileops.backend`).

=================  ==============================================================
op                 what it computes
=================  ==============================================================
dwconv_bn_act      depthwise KxK conv -> BatchNorm (train or eval) -> activation
dwconv_act         depthwise KxK conv + bias -> activation (BN folded by fuse())
bn_act             BatchNorm -> activation (after a dense cuDNN convolution)
squeeze_excite     SE: pool -> FC -> ReLU -> FC -> gate -> rescale -> activation
activation         an activation by name (``ACTIVATIONS``)
=================  ==============================================================
"""

from mobileops.ops import (
           dwconv_bn_act_kernels,  # noqa: F401  (registers the triton and cuda backends)
           squeeze_excite_kernels,  # noqa: F401  (registers the triton and cuda backends)
)
from mobileops.ops.activation import ACTIVATIONS, GATES, activation
from mobileops.ops.bn_act import bn_act
from mobileops.ops.dwconv_bn_act import dwconv_act, dwconv_bn_act
from mobileops.ops.squeeze_excite import squeeze_excite

__all__ = ["ACTIVATIONS", "GATES", "activation", "bn_act", "dwconv_act", "dwconv_bn_act",
           "squeeze_excite"]
