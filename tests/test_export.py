"""Export: ONNX (checked with onnxruntime) and torch.jit.trace of both detectors, eval mode,
with and without BN folding. While exporting, every fused op records the plain PyTorch
composition (backend.exporting), so the graphs hold standard operators only, whichever
backend is selected."""

import io

import pytest
import torch
from helpers import DEVICES, runnable_backends

import mobileops
from mobileops import backend, yolo

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

DETECTORS = ["yolov5n-c3uib", "yolov5-mobilenetv3"]
#: The fused backend the export runs under: the one a user of a GPU would have selected.
FUSED = "triton" if "triton" in runnable_backends("dwconv_bn_act", DEVICES[0]) else "torch"


def _model(cfg, fold):
    torch.manual_seed(0)
    model = yolo.build(cfg).eval()
    return model.fuse() if fold else model


def _onnx_bytes(model, x, **kwargs):
    buffer = io.BytesIO()
    with mobileops.use_backend(FUSED), backend.record_calls() as calls:
        torch.onnx.export(model, (x,), buffer, input_names=["images"], **kwargs)
    assert calls and {c["backend"] for c in calls} == {"torch"}, "exports must record the torch composition"
    return buffer.getvalue()


def _run_onnx(data, x):
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(out) for out in session.run(None, {"images": x.numpy()})]


@pytest.mark.parametrize("fold", [False, True], ids=["unfolded", "folded"])
@pytest.mark.parametrize("cfg", DETECTORS)
def test_onnx_export_runs_in_onnxruntime_like_pytorch(cfg, fold):
    model = _model(cfg, fold)
    x = torch.randn(1, 3, 64, 64)
    data = _onnx_bytes(model, x, dynamo=False, opset_version=17, dynamic_axes={"images": {0: "batch"}})
    graph = onnx.load_from_string(data).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}, "only standard ONNX operators"
    assert "Conv" in {node.op_type for node in graph.node}
    x2 = torch.randn(2, 3, 64, 64)  # another batch size: nothing was baked in at export
    with torch.no_grad():
        expected = model(x2)
    got = _run_onnx(data, x2)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-3)
    for level_got, level_expected in zip(got[1:], expected[1]):
        torch.testing.assert_close(level_got, level_expected, rtol=1e-4, atol=1e-4)


def test_dynamo_onnx_exporter_records_standard_operators_too():
    """torch.onnx.export(dynamo=True) goes through torch.export; the ops still fall back."""
    pytest.importorskip("onnxscript")
    block = mobileops.nn.MobileNetv3(16, 24, 64, 3, 2, 1, 1).eval()
    x = torch.randn(1, 16, 12, 12)
    data = _onnx_bytes(block, x, dynamo=True, opset_version=18)
    assert {node.domain for node in onnx.load_from_string(data).graph.node} <= {"", "ai.onnx"}
    with torch.no_grad():
        torch.testing.assert_close(_run_onnx(data, x)[0], block(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", DETECTORS)
def test_jit_trace_records_standard_operators(cfg):
    model = _model(cfg, fold=False)
    x = torch.randn(1, 3, 64, 64)
    with mobileops.use_backend(FUSED), torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False, strict=False)
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::_convolution" in kinds and "aten::batch_norm" in kinds
    assert not any(kind.startswith("mobileops::") for kind in kinds)
    x2 = torch.randn(1, 3, 64, 64)  # a new input: the trace computes, it did not record constants
    with torch.no_grad():
        torch.testing.assert_close(traced(x2)[0], model(x2)[0], rtol=1e-5, atol=1e-5)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(buffer)(x2)[0], model(x2)[0], rtol=1e-5, atol=1e-5)


def test_exporting_flag_follows_the_tracers():
    assert not backend.exporting()
    seen = []
    module = _Probe(seen)
    torch.jit.trace(module, (torch.randn(2),), check_trace=False)
    assert seen == [True]


class _Probe(torch.nn.Module):
    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def forward(self, x):
        self.seen.append(backend.exporting())
        return x * 2
