"""Whole detectors on the triton backend: forward and backward parity with the torch backend
(outputs, input and parameter gradients, BN running statistics), in float64. Without a GPU
the kernels run in Triton's slow CPU interpreter, so the detectors are width-reduced copies
of the shipped configs (same blocks, kernel sizes, strides, SE and activations) at 32x32, in
training mode only (eval mode is covered op by op; on a GPU by the eval test here)."""

import copy

import pytest
import torch

import mobileops
from mobileops import backend, yolo

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _narrow(cfg: str) -> dict:
    """The shipped config with every channel count divided by 16, at least 8 (MobileNetv3 rows
    are verbatim channels; the others scale through width_multiple)."""
    data = yolo.load_config(cfg)
    data["width_multiple"] = data["width_multiple"] / 16
    for row in data["backbone"] + data["head"]:
        if row[2] in ("MobileNetv3", "Conv3BN"):
            row[3] = [max(8, a // 16) if i < (2 if row[2] == "MobileNetv3" else 1) else a for i, a in enumerate(row[3])]
    return data


def _relative_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


@pytest.mark.skipif(DEVICE != "cuda", reason="eval-mode detectors at 320 need a GPU; on CPU training mode is "
                    "covered by test_training_steps_match_between_backends")
@pytest.mark.parametrize("cfg", ["yolov5n-c3uib", "yolov5-mobilenetv3"])
def test_detector_eval_parity_between_backends(cfg):
    training = False
    torch.manual_seed(0)
    model = yolo.build(cfg).double().to(DEVICE).train(training)
    x = torch.randn(2, 3, 320, 320, dtype=torch.float64, device=DEVICE)
    results = []
    for backend_name in ("torch", "triton"):
        net = copy.deepcopy(model)
        xi = x.clone().requires_grad_(True)
        with mobileops.use_backend(backend_name), backend.record_calls() as calls:
            out = net(xi)
            outputs = out if training else [out[0]] + list(out[1])
            sum((o * o).mean() for o in outputs).backward()
        assert {c["backend"] for c in calls} == {backend_name}
        results.append((outputs, xi.grad, dict(net.named_parameters()), dict(net.named_buffers())))
    (out0, dx0, params0, bufs0), (out1, dx1, params1, bufs1) = results
    ops_used = {c["op"] for c in calls}
    assert {"dwconv_bn_act", "bn_act"} <= ops_used and ("squeeze_excite" in ops_used) == ("mobilenetv3" in cfg)
    for a, b in zip(out1, out0):
        assert _relative_error(a, b) < 1e-9
    # At 32x32 the deepest BatchNorms normalise over 2 values per channel; their backward
    # amplifies float64 rounding, hence the looser bound on gradients.
    # Some gradients are exactly zero in exact arithmetic (the bias of a BatchNorm whose output
    # feeds another training-mode BatchNorm), so an absolute floor relative to the largest
    # gradient of the model applies too.
    assert _relative_error(dx1, dx0) < 1e-7
    scale = max(p.grad.abs().max().item() for p in params0.values())
    for name, p in params0.items():
        err = (params1[name].grad - p.grad).abs().max().item()
        assert err <= 1e-7 * p.grad.abs().max().item() + 1e-10 * scale, f"{name}: {err:.3g}"
    for name, b in bufs0.items():
        torch.testing.assert_close(bufs1[name], b, rtol=1e-7, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


# On CPU only the MobileNetV3 detector (it runs every fused op, SE included): tracing each
# detector through the interpreter costs ~15 s of the 10-minute CI budget.
@pytest.mark.parametrize("cfg", ["yolov5n-c3uib", "yolov5-mobilenetv3"] if DEVICE == "cuda" else ["yolov5-mobilenetv3"])
def test_detector_compiles_without_graph_breaks(cfg):
    """torch.compile(fullgraph=True) of a whole detector on the triton backend matches the
    eager torch backend: a training step on a GPU (inductor); on CPU an eval forward through
    aot_eager (the interpreter is slow)."""
    torch.manual_seed(0)
    cuda = DEVICE == "cuda"
    model = yolo.build(cfg if cuda else _narrow(cfg)).double().to(DEVICE).train(cuda)
    x = torch.randn(2, 3, 320 if cuda else 32, 320 if cuda else 32, dtype=torch.float64, device=DEVICE)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if cuda else "aot_eager")
    with torch.set_grad_enabled(cuda):
        with mobileops.use_backend("torch"):  # the reference runs eagerly, quickly
            expected = eager(x)
        with mobileops.use_backend("triton"):
            got = compiled(x)
        expected = expected if cuda else expected[0]
        got = got if cuda else got[0]
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
        if cuda:
            sum((o * o).mean() for o in expected).backward()
            with mobileops.use_backend("triton"):
                sum((o * o).mean() for o in got).backward()
            for (name, p), q in zip(model.named_parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("cfg", ["yolov5n-c3uib", "yolov5-mobilenetv3"])
def test_training_steps_match_between_backends(cfg):
    """Optimizer steps with the YOLOv5 loss (mobileops.yolo.train.Trainer) from the same seed
    on the torch and triton backends: the same loss parts, first-step gradients of every
    parameter, parameters and running statistics (float64; on CPU the narrow detector at
    32x32 and one step, in Triton's interpreter; on a GPU the real detector, three steps)."""
    from mobileops.yolo.train import Trainer, synthetic_batches

    torch.manual_seed(0)
    cuda = DEVICE == "cuda"
    size, steps = (320, 3) if cuda else (32, 1)
    model = yolo.build(cfg if cuda else _narrow(cfg)).double().to(DEVICE)
    batches = [(x.to(DEVICE), t.to(DEVICE))
               for x, t in synthetic_batches(steps, 2, size, model.model[-1].nc, seed=3, dtype=torch.float64)]
    curves, first_grads, states = [], [], []
    for backend_name in ("torch", "triton"):
        net = copy.deepcopy(model)
        trainer = Trainer(net, img_size=size, lr=0.01)
        curve = []
        with mobileops.use_backend(backend_name), backend.record_calls() as calls:
            for step, (x, t) in enumerate(batches):
                curve.append(trainer.step(x, t))
                if step == 0:
                    first_grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
        assert {c["backend"] for c in calls} == {backend_name}
        curves.append(curve)
        states.append(net.state_dict())
    for step, (a, b) in enumerate(zip(*curves)):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12, msg=lambda m, s=step: f"loss parts, step {s}: {m}")
    # As in the eval test: the deepest BatchNorms normalise few values per channel, which
    # amplifies float64 rounding, and some gradients are zero in exact arithmetic.
    scale = max(g.abs().max().item() for g in first_grads[0].values())
    for name, g in first_grads[0].items():
        err = (first_grads[1][name] - g).abs().max().item()
        assert err <= 1e-7 * g.abs().max().item() + 1e-10 * scale, f"grad of {name}: {err:.3g}"
    for name, a in states[0].items():
        torch.testing.assert_close(states[1][name], a, rtol=1e-7, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
