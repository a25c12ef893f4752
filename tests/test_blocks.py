"""Drop-in parity: mobileops blocks vs the independent seed blocks in mobileops/reference.py."""

import pytest
import torch
from helpers import assert_modules_match, count_bn, load_from, randomize_bn
from torch import nn

import mobileops
from mobileops import nn as mnn
from mobileops import reference as ref_blocks

UIB_CONFIGS = [
    # inp, oup, start_k, middle_k, middle_downsample, stride, expand_ratio
    (16, 16, 3, 3, 1, 1, 1),
    (16, 24, 5, 3, 1, 2, 4),
    (8, 16, 3, 5, 0, 2, 2),
    (12, 12, 0, 3, 1, 1, 3),
    (12, 20, 3, 0, 1, 2, 2),  # seed quirk: stride silently dropped
    (17, 17, 5, 5, 1, 2, 6),
]

MNV3_CONFIGS = [
    # inp, oup, hidden, k, stride, use_se, use_hs
    (16, 16, 16, 3, 1, 0, 0),
    (16, 16, 16, 3, 2, 1, 1),
    (16, 24, 64, 3, 2, 0, 0),
    (24, 40, 72, 5, 2, 1, 0),
    (40, 40, 120, 5, 1, 1, 0),
    (24, 24, 72, 3, 1, 0, 1),
    (24, 32, 96, 5, 2, 1, 1),
    (32, 32, 96, 5, 1, 1, 1),
]


def _pair(ref_cls, our_cls, *args, **kwargs):
    torch.manual_seed(0)
    ref = randomize_bn(ref_cls(*args, **kwargs))
    ours = our_cls(*args, **kwargs)
    return ref, load_from(ref, ours)


def _input(c, n=2, h=9, w=11, seed=1):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


CASES = (
    [pytest.param(ref_blocks.RefUIB, mnn.UniversalInvertedBottleneckBlock, cfg, cfg[0], id=f"uib{cfg}")
     for cfg in UIB_CONFIGS]
    + [pytest.param(ref_blocks.RefMobileNetv3, mnn.MobileNetv3, cfg, cfg[0], id=f"mnv3{cfg}")
       for cfg in MNV3_CONFIGS]
    + [pytest.param(ref_blocks.RefC3UIB, mnn.C3_UIB, cfg, cfg[0], id=f"c3uib{cfg}")
       for cfg in [(16, 32, 1), (24, 24, 2, False), (3, 16, 1, True, 1, 0.25)]]
    + [pytest.param(ref_blocks.RefConv, mnn.Conv, cfg, cfg[0], id=f"conv{cfg}")
       for cfg in [(3, 16, 3, 2), (8, 8, 3, 1, None, 8), (8, 8, 5, 2, None, 8), (8, 16, 1, 1, None, 1, 1, False),
                   (8, 8, 3, 1, None, 1, 2), (6, 12, 3, 1, None, 2)]]
    + [pytest.param(ref_blocks.RefBottleneck, mnn.Bottleneck, cfg, cfg[0], id=f"bottleneck{cfg}")
       for cfg in [(16, 16), (16, 16, False), (8, 16)]]
    + [pytest.param(ref_blocks.RefC3, mnn.C3, cfg, cfg[0], id=f"c3{cfg}")
       for cfg in [(16, 32, 1), (16, 16, 2, False)]]
    + [pytest.param(ref_blocks.RefSPPF, mnn.SPPF, (16, 24), 16, id="sppf"),
       pytest.param(ref_blocks.RefSELayer, mnn.SELayer, (72,), 72, id="se72"),
       pytest.param(ref_blocks.RefSELayer, mnn.SELayer, (17, 4), 17, id="se17"),
       pytest.param(ref_blocks.RefConv3BN, mnn.Conv3BN, (3, 16, 2), 3, id="conv3bn")]
)


@pytest.mark.parametrize("ref_cls,our_cls,cfg,c_in", CASES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_block_matches_seed(ref_cls, our_cls, cfg, c_in, train):
    ref, ours = _pair(ref_cls, our_cls, *cfg)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert_modules_match(ours, ref, _input(c_in), train=train, steps=2)


@pytest.mark.parametrize("momentum", [None, 0.03])
def test_training_running_stats_follow_batchnorm_semantics(momentum):
    """Cumulative (momentum=None) and YOLOv5 (eps 1e-3, momentum 0.03) BN updates."""
    ref, ours = _pair(ref_blocks.RefMobileNetv3, mnn.MobileNetv3, 24, 24, 72, 5, 1, 1, 1)
    for module in (ref, ours):
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum, bn.eps = momentum, 1e-3
    assert_modules_match(ours, ref, _input(24), train=True, steps=3)
    bn = ours.conv[4]
    assert int(bn.num_batches_tracked) == 3


def test_channels_last_input_keeps_layout_and_values():
    ref, ours = _pair(ref_blocks.RefUIB, mnn.UniversalInvertedBottleneckBlock, 16, 16)
    x = _input(16).to(memory_format=torch.channels_last)
    ref.eval(), ours.eval()
    y = ours(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref(x), rtol=1e-9, atol=1e-10)


def test_checkpoint_of_seed_blocks_loads_strictly_and_rejects_foreign_keys():
    ref, ours = _pair(ref_blocks.RefUIB, mnn.UniversalInvertedBottleneckBlock, 16, 16, 3, 0)
    assert "_middle_dw.conv.weight" not in ours.state_dict()
    assert "_middle_dw.BatchNorm2d.running_mean" in mnn.UniversalInvertedBottleneckBlock(16, 16).state_dict()
    bad = dict(ref.state_dict())
    bad["_middle_dw.conv.weight"] = torch.zeros(16, 1, 3, 3)
    with pytest.raises(RuntimeError, match="_middle_dw"):
        ours.load_state_dict(bad, strict=True)


def test_seed_quirks_are_the_default():
    assert mnn.make_divisible(20, 8) == 24 and mnn.make_divisible(12, 8) == 16 and mnn.make_divisible(64, 8) == 64
    uib = mnn.UniversalInvertedBottleneckBlock(16, 16)
    x = torch.randn(1, 16, 5, 5)
    assert not uib.use_residual
    # middle_dw_kernel_size=0 with middle_dw_downsample drops the stride, as in the seed.
    assert mnn.UniversalInvertedBottleneckBlock(8, 8, 3, 0, 1, 2).eval()(torch.randn(1, 8, 6, 6)).shape[-1] == 6
    c3 = mnn.C3_UIB(16, 16, 1, shortcut=True)
    assert not c3.m[0].use_residual
    assert mnn.SELayer(72).fc[0].out_features == 18
    assert uib.eval()(x).shape == x.shape


def test_uib_official_options():
    torch.manual_seed(0)
    ref = randomize_bn(ref_blocks.RefUIB(16, 16)).double().eval()
    ours = mnn.UniversalInvertedBottleneckBlock(16, 16, residual=True, layer_scale_init_value=1e-5)
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert missing == ["layer_scale.gamma"] and not unexpected
    ours.double().eval()
    with torch.no_grad():
        ours.layer_scale.gamma.copy_(torch.linspace(0.5, 2.0, 16))
    x = _input(16)
    scale = torch.linspace(0.5, 2.0, 16, dtype=torch.float64).view(1, -1, 1, 1)
    torch.testing.assert_close(ours(x), x + ref(x) * scale)
    # residual only applies where shapes allow it
    assert not mnn.UniversalInvertedBottleneckBlock(16, 24, residual=True).use_residual
    assert not mnn.UniversalInvertedBottleneckBlock(16, 16, stride=2, residual=True).use_residual
    with pytest.raises(ValueError, match="middle depthwise"):
        mnn.UniversalInvertedBottleneckBlock(8, 8, 3, 0, 1, 2, check_stride=True)
    with pytest.raises(ValueError, match="start depthwise"):
        mnn.UniversalInvertedBottleneckBlock(8, 8, 0, 3, 0, 2, check_stride=True)
    with pytest.raises(ValueError, match="stride"):
        mnn.UniversalInvertedBottleneckBlock(8, 8, stride=0)


def test_c3_uib_use_shortcut_turns_on_uib_residual():
    c3 = mnn.C3_UIB(16, 32, 2, shortcut=True, use_shortcut=True)
    assert all(m.use_residual for m in c3.m)
    assert not any(m.use_residual for m in mnn.C3_UIB(16, 32, 2, shortcut=False, use_shortcut=True).m)


def test_mobilenetv3_se_after_act_matches_torchvision_order():
    torch.manual_seed(0)
    ref = randomize_bn(ref_blocks.RefMobileNetv3(24, 32, 96, 5, 1, 1, 1)).double().eval()
    ours = mnn.MobileNetv3(24, 32, 96, 5, 1, 1, 1, se_after_act=True)
    load_from(ref, ours).eval()
    c = ref.conv
    x = _input(24)
    expected = c[8](c[7](c[5](c[6](c[4](c[3](c[2](c[1](c[0](x)))))))))
    torch.testing.assert_close(ours(x), expected)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        mnn.MobileNetv3(16, 16, 16, 3, 3, 0, 0)


def test_unknown_activation_module_still_runs_as_written():
    act = nn.LeakyReLU(0.1)
    ref, ours = _pair(ref_blocks.RefConv, mnn.Conv, 8, 8, 3, 1, None, 8, 1, act)
    assert_modules_match(ours, ref, _input(8), train=True)


FUSE_CASES = [c for c in CASES if c.values[0] is not ref_blocks.RefSELayer]


@pytest.mark.parametrize("ref_cls,our_cls,cfg,c_in", FUSE_CASES)
def test_fuse_folds_every_bn_and_keeps_outputs(ref_cls, our_cls, cfg, c_in):
    _, ours = _pair(ref_cls, our_cls, *cfg)
    ours.eval()
    x = _input(c_in)
    with torch.no_grad():
        before = ours(x)
        assert ours.fuse() is ours
        assert count_bn(ours) == 0
        torch.testing.assert_close(ours(x), before, rtol=1e-9, atol=1e-10)
        ours.fuse()  # idempotent
        torch.testing.assert_close(ours(x), before, rtol=1e-9, atol=1e-10)


def test_fused_float32_stays_within_rounding():
    torch.manual_seed(0)
    block = randomize_bn(mnn.C3_UIB(16, 32, 2)).eval()
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        before = block(x)
        after = block.fuse()(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_top_level_reexports_nn():
    for name in ("C3_UIB", "UniversalInvertedBottleneckBlock", "MobileNetv3", "Conv3BN", "SELayer",
                 "h_swish", "h_sigmoid", "make_divisible", "Conv", "Bottleneck", "C3", "SPPF",
                 "Concat", "Detect"):
        assert getattr(mobileops, name) is getattr(mnn, name)


def test_h_swish_and_h_sigmoid_match_seed_formula():
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    torch.testing.assert_close(mnn.h_sigmoid()(x), ref_blocks.RefHSigmoid()(x.clone()))
    torch.testing.assert_close(mnn.h_swish()(x), ref_blocks.RefHSwish()(x.clone()))


@pytest.mark.parametrize("block", [
    lambda: mnn.MobileNetv3(24, 24, 72, 5, 1, 1, 1), lambda: mnn.C3_UIB(16, 16, 1),
    lambda: mnn.MobileNetv3(16, 16, 16, 3, 2, 1, 0),
], ids=["mnv3-expand-se", "c3uib", "mnv3-dw-se"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_blocks_trace_with_torch_compile_fullgraph(block, train):
    """Dynamo traces the op dispatch without graph breaks (compiled with the eager backend to
    keep CPU test time low; inductor itself is exercised on GPU)."""
    torch.manual_seed(0)
    module = block().train(train)
    twin = block().train(train)
    twin.load_state_dict(module.state_dict())
    x = torch.randn(2, _in_channels(module), 8, 8)
    compiled = torch.compile(twin, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x))
    for name, b in module.named_buffers():
        torch.testing.assert_close(dict(twin.named_buffers())[name], b)


def _in_channels(module):
    first_conv = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
    return first_conv.in_channels


@pytest.mark.parametrize("make,c_in", [(lambda: mnn.C3_UIB(16, 32), 16),
                                       (lambda: mnn.MobileNetv3(24, 40, 72, 5, 2, 1, 0), 24),
                                       (lambda: mnn.UniversalInvertedBottleneckBlock(8, 8), 8),
                                       (lambda: mnn.Conv3BN(3, 16, 2), 3), (lambda: mnn.Conv(8, 16, 3, 2), 8),
                                       (lambda: mnn.Conv(8, 8, 3, 1, None, 8), 8), (lambda: mnn.Bottleneck(16, 16), 16),
                                       (lambda: mnn.C3(16, 32, 1), 16), (lambda: mnn.SPPF(16, 24), 16)],
                         ids=["c3uib", "mnv3", "uib", "conv3bn", "conv", "dwconv", "bottleneck", "c3", "sppf"])
def test_blocks_reject_bad_input(make, c_in):
    block = make()
    expected = rf"expected a floating \(N, {c_in}, H, W\) tensor, got shape \(2, {c_in + 1}, 8, 8\)"
    with pytest.raises(ValueError, match=expected):
        block(torch.randn(2, c_in + 1, 8, 8))
    with pytest.raises(ValueError, match="got shape"):
        block(torch.randn(c_in, 8, 8))
    with pytest.raises(TypeError, match="got dtype torch.int64"):
        block(torch.ones(2, c_in, 8, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="input has dtype torch.float64 but the block's weights have torch.float32"):
        block(torch.randn(2, c_in, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="input is on cpu but the block's weights are on meta"):
        block.to("meta")(torch.randn(2, c_in, 8, 8))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_blocks_take_mixed_dtypes_under_autocast_like_the_seed(train):
    """The dtype check above stands aside under autocast, where the seed block runs too."""
    torch.manual_seed(0)
    ours = mnn.C3_UIB(8, 16).train(train)
    seed = ref_blocks.RefC3UIB(8, 16).train(train)
    seed.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 8, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = ours(x), seed(x)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)


BAD_SIZES = [
    (lambda: mnn.Conv(0, 16), r"Conv: c1 must be an integer >= 1, got 0"),
    (lambda: mnn.Conv(8, 16, 0), r"Conv: k must be an integer >= 1, got 0"),
    (lambda: mnn.Conv(8, 16, (3, 0)), r"Conv: k must be an integer >= 1, got \(3, 0\)"),
    (lambda: mnn.Conv(8, 16, 3, 0), r"Conv: s must be an integer >= 1, got 0"),
    (lambda: mnn.Conv(8, 16, 3, 1, -1), r"Conv: p must be an integer >= 0, got -1"),
    (lambda: mnn.Conv(8, 16, 3, 1.5), r"Conv: s must be an integer >= 1, got 1.5"),
    (lambda: mnn.Bottleneck(16, True), r"Bottleneck: c2 must be an integer >= 1, got True"),
    (lambda: mnn.Bottleneck(16, 16, e=0.01), r"Bottleneck: e=0.01 gives int\(c2 \* e\) = 0 hidden channels"),
    (lambda: mnn.C3(16, 32, -1), r"C3: n must be an integer >= 0, got -1"),
    (lambda: mnn.C3_UIB(0, 32), r"C3_UIB: c1 must be an integer >= 1, got 0"),
    (lambda: mnn.C3_UIB(16, 32, 1, e=0), r"C3_UIB: e=0 gives int\(c2 \* e\) = 0 hidden channels"),
    (lambda: mnn.SPPF(16, 24, 4), r"SPPF: k must be odd"),
    (lambda: mnn.SPPF(1, 24), r"SPPF: c1 must be an integer >= 2, got 1"),
    (lambda: mnn.SELayer(0), r"SELayer: channel must be an integer >= 1, got 0"),
    (lambda: mnn.SELayer(3), r"SELayer: channel // reduction is 0 \(3 // 4\)"),
    (lambda: mnn.Conv3BN(3, 16, 0), r"Conv3BN: stride must be an integer >= 1, got 0"),
    (lambda: mnn.MobileNetv3(24, 40, 72, 0, 2, 1, 0), r"MobileNetv3: kernel_size must be an integer >= 1, got 0"),
    (lambda: mnn.MobileNetv3(24, 40, -72, 3, 2, 1, 0), r"MobileNetv3: hidden_dim must be an integer >= 1, got -72"),
    (lambda: mnn.UniversalInvertedBottleneckBlock(8, 8, start_dw_kernel_size=-1),
     r"UniversalInvertedBottleneckBlock: start_dw_kernel_size must be an integer >= 0, got -1"),
    (lambda: mnn.UniversalInvertedBottleneckBlock(8, 8, expand_ratio=-1),
     r"UniversalInvertedBottleneckBlock: expand_ratio must be a number > 0, got -1"),
]


@pytest.mark.parametrize("make, match", [pytest.param(make, match, id=f"{i}-{match.split(':')[0]}")
                                         for i, (make, match) in enumerate(BAD_SIZES)])
def test_constructors_reject_sizes_that_cannot_work(make, match):
    """Zero or negative sizes, a hidden width of zero, an even SPPF pool or a negative expand
    ratio fail at construction, naming the block and the argument, instead of building a module
    that fails inside PyTorch at the first forward or runs with a meaningless width."""
    with pytest.raises(ValueError, match=match):
        make()


def test_constructors_still_take_what_the_seed_blocks_take():
    # even depthwise kernels, no bottlenecks, tuple kernel sizes and strides: legal in the seeds
    mnn.MobileNetv3(24, 40, 72, 4, 2, 1, 0)
    mnn.UniversalInvertedBottleneckBlock(8, 8, start_dw_kernel_size=0, middle_dw_kernel_size=4, expand_ratio=0.5)
    mnn.C3(16, 32, 0)
    mnn.Conv(8, 16, (3, 1), (2, 1))


def test_se_layer_rejects_bad_input_naming_the_argument():
    se = mnn.SELayer(72)
    with pytest.raises(ValueError, match=r"fc1_weight must have shape \(18, 73\) to match x of shape \(2, 73, 8, 8\)"):
        se(torch.randn(2, 73, 8, 8))
    with pytest.raises(ValueError, match="x must be a 4-D"):
        se(torch.randn(72, 8, 8))
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64, got torch.int64"):
        se(torch.ones(2, 72, 8, 8, dtype=torch.long))
