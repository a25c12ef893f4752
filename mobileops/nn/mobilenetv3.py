"""MobileNetV3 blocks as used in YOLOv5-MobileNetV3: SELayer, Conv3BN, MobileNetv3.

Defaults reproduce the seed (whose checkpoints users have); the torchvision/timm ordering of
SE and activation in the expand branch is opt-in (``MobileNetv3(..., se_after_act=True)``).
"""

from __future__ import annotations

import torch
from torch import nn

from mobileops import ops
from mobileops.nn.activation import activation_name, h_sigmoid, h_swish
from mobileops.nn.fused import conv_bn_act
from mobileops.nn.helpers import check_sizes, fuse_conv_bn


class SELayer(nn.Module):
    """Squeeze-and-Excitation with hard-sigmoid gate.

    ``x * h_sigmoid(fc2(relu(fc1(avgpool(x)))))`` with ``fc`` = Sequential(Linear(C, C // r),
    ReLU, Linear(C // r, C), h_sigmoid); hidden width is plain ``channel // reduction``.

    Args:
        channel: channels C.
        reduction: squeeze ratio r.
    """

    def __init__(self, channel, reduction=4):
        super().__init__()
        check_sizes("SELayer", channel=channel, reduction=reduction)
        if channel // reduction < 1:
            raise ValueError(f"SELayer: channel // reduction is {channel // reduction} ({channel} // {reduction}); "
                             "the squeeze layer needs at least 1")
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel),
            h_sigmoid(),
        )

    def forward(self, x: torch.Tensor, post_act: nn.Module | None = None) -> torch.Tensor:
        """Apply SE, then ``post_act`` (an activation module or None) fused into the same op."""
        fc1, relu, fc2, gate = self.fc
        gate_name = activation_name(gate)
        post_name = activation_name(post_act)
        if (type(fc1) is nn.Linear and type(fc2) is nn.Linear and activation_name(relu) == "relu"
                and gate_name in ops.GATES):
            op_post = post_name if post_name in ops.ACTIVATIONS else "none"
            y = ops.squeeze_excite(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
                                   gate=gate_name, post_act=op_post)
            return y if op_post == post_name else post_act(y)
        # The fc stack was changed to something the op cannot express: run it as written.
        b, c = x.shape[:2]
        y = x * self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)
        return y if post_act is None else post_act(y)


class Conv3BN(nn.Module):
    """MobileNetV3 stem: 3x3 conv (padding 1, no bias) -> BatchNorm2d -> h_swish.

    Args:
        inp, oup: input and output channels.
        stride: convolution stride.
    """

    def __init__(self, inp, oup, stride):
        super().__init__()
        check_sizes("Conv3BN", inp=inp, oup=oup, stride=stride)
        self.conv = nn.Conv2d(inp, oup, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(oup)
        self.act = h_swish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn_act(x, self.conv, self._modules.get("bn"), self.act)

    def fuse(self) -> Conv3BN:
        """Fold ``bn`` into ``conv`` (the ``bn`` keys disappear)."""
        fuse_conv_bn(self, "conv", "bn")
        return self


class MobileNetv3(nn.Module):
    """MobileNetV3 inverted residual block (the seed's class name).

    ``conv`` is a Sequential whose indices are ``state_dict`` keys:

    * ``inp == hidden_dim``: [0] depthwise k/stride, [1] BN, [2] act, [3] SE or empty,
      [4] 1x1 to oup, [5] BN.
    * otherwise: [0] 1x1 expand, [1] BN, [2] act, [3] depthwise k/stride, [4] BN,
      [5] SE or empty, [6] act, [7] 1x1 to oup, [8] BN.

    The output is ``x + conv(x)`` when ``stride == 1`` and ``inp == oup``.

    Args:
        inp, oup: input and output channels.
        hidden_dim: expanded width.
        kernel_size: depthwise kernel.
        stride: 1 or 2.
        use_se: insert an :class:`SELayer` (reduction 4).
        use_hs: activation h_swish (else ReLU).
        se_after_act: keyword-only. In the expand branch the seed applies SE before the
            second activation (``[5]`` then ``[6]``); True applies the activation first, as
            torchvision and timm do. Same parameters and keys either way.
    """

    def __init__(self, inp, oup, hidden_dim, kernel_size, stride, use_se, use_hs, *,
                 se_after_act: bool = False):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MobileNetv3: stride must be 1 or 2, got {stride!r}")
        check_sizes("MobileNetv3", inp=inp, oup=oup, hidden_dim=hidden_dim, kernel_size=kernel_size)
        self.identity = stride == 1 and inp == oup
        self.expand = inp != hidden_dim
        self.se_after_act = bool(se_after_act)

        def act():
            return h_swish() if use_hs else nn.ReLU(inplace=True)

        def depthwise():
            return nn.Conv2d(hidden_dim, hidden_dim, kernel_size, stride, (kernel_size - 1) // 2,
                             groups=hidden_dim, bias=False)

        se = SELayer(hidden_dim) if use_se else nn.Sequential()
        if not self.expand:
            self.conv = nn.Sequential(
                depthwise(), nn.BatchNorm2d(hidden_dim), act(), se,
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
            )
        else:
            self.conv = nn.Sequential(
                nn.Conv2d(inp, hidden_dim, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden_dim), act(),
                depthwise(), nn.BatchNorm2d(hidden_dim), se, act(),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
            )

    @staticmethod
    def _se(x, se, post_act=None):
        if isinstance(se, SELayer):
            return se(x, post_act)
        y = se(x)
        return y if post_act is None else post_act(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if not self.expand:
            y = conv_bn_act(x, c[0], c[1], c[2])
            y = self._se(y, c[3])
            y = conv_bn_act(y, c[4], c[5], None)
        else:
            y = conv_bn_act(x, c[0], c[1], c[2])
            se = c[5]
            if type(se) is nn.Sequential and len(se) == 0:  # no SE: the act fuses into the dw op
                y = conv_bn_act(y, c[3], c[4], c[6])
            elif self.se_after_act:
                y = self._se(conv_bn_act(y, c[3], c[4], c[6]), se)
            else:
                y = self._se(conv_bn_act(y, c[3], c[4], None), se, c[6])
            y = conv_bn_act(y, c[7], c[8], None)
        return x + y if self.identity else y

    def fuse(self) -> MobileNetv3:
        """Fold every BN into its conv; BN slots become ``nn.Identity`` so indices stay."""
        conv_bn_pairs = ((0, 1), (4, 5)) if not self.expand else ((0, 1), (3, 4), (7, 8))
        for conv_index, bn_index in conv_bn_pairs:
            fuse_conv_bn(self.conv, str(conv_index), str(bn_index), keep_slot=True)
        return self
