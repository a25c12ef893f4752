"""Plain-PyTorch versions of the seed blocks (behaviour: docs/seed_blocks.md): the blocks users have.

Nothing here imports the rest of mobileops. These modules are what users' checkpoints come
from, the oracle the drop-in modules are tested against, and the eager baseline the
benchmarks time (``yolo.build(cfg, blocks="plain")`` assembles a detector from them). Their
``state_dict`` keys are the drop-in modules' keys.
"""

import torch
from torch import nn


def make_divisible(value, divisor, min_value=None, round_down_protect=True):
    min_value = divisor if min_value is None else min_value
    out = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if round_down_protect and out < 0.9 * value else out


def conv_2d(inp, oup, kernel_size=3, stride=1, groups=1, norm=True, act=True):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(inp, oup, kernel_size, stride, (kernel_size - 1) // 2,
                                     groups=groups, bias=False))
    if norm:
        seq.add_module("BatchNorm2d", nn.BatchNorm2d(oup))
    if act:
        seq.add_module("Activation", nn.ReLU6())
    return seq


class RefUIB(nn.Module):
    def __init__(self, inp, oup, start_dw_kernel_size=3, middle_dw_kernel_size=3,
                 middle_dw_downsample=1, stride=1, expand_ratio=1):
        super().__init__()
        self.start_dw_kernel_size = start_dw_kernel_size
        if start_dw_kernel_size:
            s = stride if not middle_dw_downsample else 1
            self._start_dw_ = conv_2d(inp, inp, start_dw_kernel_size, s, inp, act=False)
        hidden = make_divisible(inp * expand_ratio, 8)
        self._expand_conv = conv_2d(inp, hidden, 1)
        self.middle_dw_kernel_size = middle_dw_kernel_size
        if middle_dw_kernel_size:
            s = stride if middle_dw_downsample else 1
            self._middle_dw = conv_2d(hidden, hidden, middle_dw_kernel_size, s, hidden)
        self._proj_conv = conv_2d(hidden, oup, 1, act=False)

    def forward(self, x):
        if self.start_dw_kernel_size:
            x = self._start_dw_(x)
        x = self._expand_conv(x)
        if self.middle_dw_kernel_size:
            x = self._middle_dw(x)
        return self._proj_conv(x)


def autopad(k, p=None, d=1):
    if d > 1:
        k = d * (k - 1) + 1
    return k // 2 if p is None else p


class RefConv(nn.Module):
    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class RefBottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = RefConv(c1, c_, 1, 1)
        self.cv2 = RefConv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class RefC3(nn.Module):
    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = RefConv(c1, c_, 1, 1)
        self.cv2 = RefConv(c1, c_, 1, 1)
        self.cv3 = RefConv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(RefBottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], dim=1))


class RefC3UIB(RefC3):
    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__(c1, c2, 0, shortcut, g, e)
        self.m = nn.Sequential(*(RefUIB(int(c2 * e), int(c2 * e)) for _ in range(n)))


class RefSPPF(nn.Module):
    def __init__(self, c1, c2, k=5):
        super().__init__()
        self.cv1 = RefConv(c1, c1 // 2, 1, 1)
        self.cv2 = RefConv(4 * (c1 // 2), c2, 1, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        x = self.cv1(x)
        a = self.m(x)
        b = self.m(a)
        return self.cv2(torch.cat([x, a, b, self.m(b)], 1))


class RefHSigmoid(nn.Module):
    def __init__(self, inplace=True):
        super().__init__()
        self.relu = nn.ReLU6(inplace=inplace)

    def forward(self, x):
        return self.relu(x + 3) / 6


class RefHSwish(nn.Module):
    def __init__(self, inplace=True):
        super().__init__()
        self.sigmoid = RefHSigmoid(inplace=inplace)

    def forward(self, x):
        return x * self.sigmoid(x)


class RefSELayer(nn.Module):
    def __init__(self, channel, reduction=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channel, channel // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channel // reduction, channel), RefHSigmoid())

    def forward(self, x):
        b, c, _, _ = x.size()
        return x * self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)


class RefConv3BN(nn.Module):
    def __init__(self, inp, oup, stride):
        super().__init__()
        self.conv = nn.Conv2d(inp, oup, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(oup)
        self.act = RefHSwish()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class RefMobileNetv3(nn.Module):
    def __init__(self, inp, oup, hidden_dim, kernel_size, stride, use_se, use_hs):
        super().__init__()
        assert stride in [1, 2]
        self.identity = stride == 1 and inp == oup
        act = RefHSwish if use_hs else (lambda: nn.ReLU(inplace=True))
        pad = (kernel_size - 1) // 2
        se = RefSELayer(hidden_dim) if use_se else nn.Sequential()
        if inp == hidden_dim:
            self.conv = nn.Sequential(
                nn.Conv2d(hidden_dim, hidden_dim, kernel_size, stride, pad, groups=hidden_dim, bias=False),
                nn.BatchNorm2d(hidden_dim), act(), se,
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))
        else:
            self.conv = nn.Sequential(
                nn.Conv2d(inp, hidden_dim, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden_dim), act(),
                nn.Conv2d(hidden_dim, hidden_dim, kernel_size, stride, pad, groups=hidden_dim, bias=False),
                nn.BatchNorm2d(hidden_dim), se, act(),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        return x + self.conv(x) if self.identity else self.conv(x)


#: yaml module name -> plain block, for the names whose mobileops version runs fused ops.
PLAIN_BLOCKS = {"Conv": RefConv, "Bottleneck": RefBottleneck, "C3": RefC3, "C3_UIB": RefC3UIB, "SPPF": RefSPPF,
                "Conv3BN": RefConv3BN, "MobileNetv3": RefMobileNetv3,
                "UniversalInvertedBottleneckBlock": RefUIB}
