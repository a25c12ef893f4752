"""mobileops: fused GPU kernels and drop-in modules for mobile-style CNN blocks.

* :mod:`mobileops.ops` - the fused ops (``dwconv_bn_act``, ``dwconv_act``, ``bn_act``,
  ``squeeze_excite``), each dispatched to a backend.
* :mod:`mobileops.nn` - drop-in seed blocks (``C3_UIB``, ``MobileNetv3``, ...), re-exported here.
* :mod:`mobileops.yolo` - YOLOv5 detectors from yaml, and the YOLOv5 loss.
* :func:`convert` - replace the seed blocks of an existing model by the drop-in modules.
* Backend selection: :func:`set_backend`, :func:`use_backend`, :func:`available_backends`,
  :func:`backend_status`, env var ``MOBILEOPS_BACKEND``.
"""

from mobileops import ops  # registers the torch backend's implementations
from mobileops.backend import (
    BackendUnavailableError,
    available_backends,
    backend_status,
    get_backend,
    set_backend,
    use_backend,
)
from mobileops.convert import ConversionReport, convert
from mobileops.nn import (
    C3,
    C3_UIB,
    SPPF,
    Bottleneck,
    Concat,
    Conv,
    Conv3BN,
    Detect,
    MobileNetv3,
    SELayer,
    UniversalInvertedBottleneckBlock,
    h_sigmoid,
    h_swish,
    make_divisible,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "C3", "C3_UIB", "SPPF", "Bottleneck", "Concat", "ConversionReport", "Conv",
    "Conv3BN", "convert",
    "Detect", "MobileNetv3", "SELayer", "UniversalInvertedBottleneckBlock", "available_backends",
    "backend_status", "get_backend", "h_sigmoid", "h_swish", "make_divisible", "ops",
    "set_backend", "use_backend",
]
