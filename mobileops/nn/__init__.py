"""Drop-in modules: the seed blocks with their constructors and ``state_dict`` keys, running
their conv + BN + activation and SE sites through :mod:`mobileops.ops`.

Every block has ``fuse()``, folding its BatchNorms into the convolutions for inference.
"""

from mobileops.nn.activation import activation_name, h_sigmoid, h_swish
from mobileops.nn.detect import Detect
from mobileops.nn.helpers import autopad, fold_bn_into_conv, fuse_modules, make_divisible
from mobileops.nn.mobilenetv3 import Conv3BN, MobileNetv3, SELayer
from mobileops.nn.uib import C3_UIB, ConvBN, LayerScale, UniversalInvertedBottleneckBlock
from mobileops.nn.yolov5 import C3, SPPF, Bottleneck, Concat, Conv

__all__ = [
    "C3", "C3_UIB", "SPPF", "Bottleneck", "Concat", "Conv", "Conv3BN", "ConvBN", "Detect",
    "LayerScale", "MobileNetv3", "SELayer", "UniversalInvertedBottleneckBlock", "activation_name",
    "autopad", "fold_bn_into_conv", "fuse_modules", "h_sigmoid", "h_swish", "make_divisible",
]
