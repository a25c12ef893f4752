"""The training loop (mobileops.yolo.train) and ``python -m mobileops train``."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import one_error_line
from host_syncs import ForbidHostSyncs, HostSyncError

import mobileops
from mobileops import yolo
from mobileops.__main__ import main
from mobileops.yolo.checkpoint import load_weights, save_checkpoint
from mobileops.yolo.train import Trainer, make_optimizer, synthetic_batch, synthetic_batches, train


def test_synthetic_targets_are_valid_yolo_rows():
    images, targets = synthetic_batch(3, 64, 5, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 64, 64) and targets.shape == (12, 6)
    assert set(targets[:, 0].tolist()) == {0.0, 1.0, 2.0}
    assert ((targets[:, 1] >= 0) & (targets[:, 1] < 5)).all()
    x, y, w, h = targets[:, 2:].T
    assert ((x - w / 2 >= 0) & (x + w / 2 <= 1) & (y - h / 2 >= 0) & (y + h / 2 <= 1)).all()
    again = list(synthetic_batches(1, 3, 64, 5, seed=0))[0]
    assert torch.equal(again[1], targets)


def test_trainer_fits_a_fixed_batch():
    torch.manual_seed(0)
    model = yolo.build("yolov5n-c3uib", nc=3)
    trainer = Trainer(model, img_size=64, lr=0.05)
    images, targets = synthetic_batch(2, 64, 3, generator=torch.Generator().manual_seed(1))
    with mobileops.use_backend("torch"):
        first = trainer.step(images, targets).sum().item()
        for _ in range(19):
            last = trainer.step(images, targets).sum().item()
    assert last < 0.9 * first, (first, last)  # measured: 0.119 -> 0.100


def test_bf16_autocast_step_runs_and_stays_finite():
    torch.manual_seed(0)
    model = yolo.build("yolov5n-c3uib", nc=2)
    trainer = Trainer(model, img_size=64, amp="bf16")
    images, targets = synthetic_batch(2, 64, 2, generator=torch.Generator().manual_seed(2))
    parts = trainer.step(images, targets)
    assert torch.isfinite(parts).all() and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_cli_train_runs_end_to_end(capsys, tmp_path):
    assert main(["train", "--cfg", "yolov5n-c3uib", "--data", "synthetic", "--epochs", "1", "--steps", "2",
                 "--batch-size", "2", "--img-size", "64", "--quiet", "--project", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "loss" in out
    assert torch.load(tmp_path / "exp" / "weights" / "last.pt", weights_only=True)["step"] == 2


def test_train_reports_throughput_and_losses():
    torch.manual_seed(0)
    result = train(yolo.build("yolov5n-c3uib", nc=2), epochs=1, steps_per_epoch=2, batch_size=2, img_size=64,
                   channels_last=True)
    assert result.steps == 2 and len(result.losses) == 2 and result.images_per_s > 0
    assert all(math.isfinite(v) for step in result.losses for v in step)


def test_bad_training_arguments():
    model = yolo.build("yolov5n-c3uib", nc=2)
    with pytest.raises(ValueError, match="epochs"):
        train(model, epochs=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        train(model, img_size=100)
    with pytest.raises(ValueError, match="amp"):
        Trainer(model, amp="fp8")
    assert main(["train", "--data", "coco", "--quiet"]) != 0


# --- run folders, checkpoints, --resume, Ctrl-C -------------------------------------------------------------

#: The smallest detector that trains: three strides (8, 16, 32) and one C3_UIB (fused blocks), 10k parameters.
TINY = dict(name="tiny", nc=2, depth_multiple=0.33, width_multiple=0.25,
            anchors=[[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
            backbone=[[-1, 1, "Conv", [32, 3, 2]], [-1, 1, "Conv", [64, 3, 2]], [-1, 1, "C3_UIB", [64]],
                      [-1, 1, "Conv", [64, 3, 2]], [-1, 1, "Conv", [64, 3, 2]], [-1, 1, "Conv", [64, 3, 2]]],
            head=[[[3, 4, 5], 1, "Detect", ["nc", "anchors"]]])


def tiny_yaml(folder, cfg=TINY):
    path = folder / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "name"}))
    return path


def _float64_run(save_dir, seed_of_init, **kwargs):
    torch.manual_seed(seed_of_init)
    model = yolo.build(TINY).double()
    with mobileops.use_backend("torch"):
        result = train(model, epochs=3, steps_per_epoch=2, batch_size=2, img_size=32, seed=5, save_dir=save_dir,
                       options=dict(note="test"), **kwargs)
    return model, result


def test_resume_continues_bit_identically_in_float64(tmp_path):
    whole, done = _float64_run(tmp_path / "whole", 0)
    assert (done.step, done.epoch, done.interrupted) == (6, 3, False)
    calls = []
    half, stopped = _float64_run(tmp_path / "split", 0, progress=lambda *a: calls.append(a),
                                 stop=lambda: len(calls) >= 3)  # mid-epoch: epoch 1, step 1 of 2
    assert (stopped.step, stopped.interrupted, stopped.last) == (3, True, tmp_path / "split/weights/last.pt")
    saved = torch.load(stopped.last, weights_only=True)
    assert (saved["step"], saved["epoch"], saved["opt"], saved["yaml"]["name"]) == (3, 1, dict(note="test"), "tiny")
    # Different initial weights: everything must come from the checkpoint.
    resumed, rest = _float64_run(tmp_path / "split", 1, resume=stopped.last)
    assert (rest.steps, rest.step, rest.interrupted) == (3, 6, False)
    assert not any(torch.equal(a, b) for a, b in zip(half.parameters(), whole.parameters()))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    csv_lines = lambda run: [line.split(",")[:5] for line in (tmp_path / run / "results.csv").read_text().splitlines()]
    assert csv_lines("split") == csv_lines("whole") and len(csv_lines("whole")) == 4  # header + 3 epochs
    assert (tmp_path / "split" / "opt.yaml").read_text() == "note: test\n"


def test_checkpoint_loads_with_weights_only_into_both_twins(tmp_path):
    torch.manual_seed(0)
    model = yolo.build(TINY)
    result = train(model, epochs=1, steps_per_epoch=1, batch_size=2, img_size=32, save_dir=tmp_path)
    saved = torch.load(result.last, weights_only=True)
    assert set(saved) >= {"model", "optimizer", "scaler", "epoch", "step", "rng", "opt", "yaml"}
    assert isinstance(saved["rng"]["torch"], torch.Tensor) and isinstance(saved["rng"]["data"], torch.Tensor)
    for blocks in ("mobileops", "plain"):
        twin = yolo.build(saved["yaml"], blocks=blocks)
        twin.load_state_dict(saved["model"], strict=True)
        torch.testing.assert_close(twin.state_dict(), model.state_dict(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="another model"):
        load_weights(yolo.build(dict(TINY, nc=3)), result.last)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = save_checkpoint(dict(step=1), tmp_path / "weights" / "last.pt")

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(dict(step=2), path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == dict(step=1)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # what a plain open() gives, not mkstemp's 0600


def test_bad_resume_inputs_get_one_line_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "last.pt"
    assert main(["train", "--resume", str(missing)]) == 2
    assert str(missing) in one_error_line(capsys.readouterr())

    torch.manual_seed(0)
    good = train(yolo.build(TINY), epochs=2, steps_per_epoch=1, batch_size=2, img_size=32, seed=0,
                 save_dir=tmp_path / "run", options=dict(cfg="tiny", data="synthetic", epochs=2, steps=1,
                                                         batch_size=2, imgsz=32, nc=None, amp="none"),
                 stop=lambda: True).last
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    assert main(["train", "--resume", str(truncated)]) == 2
    line = one_error_line(capsys.readouterr())
    assert str(truncated) in line and "truncated or corrupt" in line

    assert main(["train", "--resume", str(good), "--cfg", "yolov5n"]) == 2
    line = one_error_line(capsys.readouterr())
    assert str(good) in line and "another model" in line

    assert main(["train", "--resume", str(good), "--batch-size", "4"]) == 2
    assert "--batch-size 4" in one_error_line(capsys.readouterr())

    assert main(["train", "--resume", "--project", str(tmp_path / "empty")]) == 2
    assert "--resume: no last.pt under" in one_error_line(capsys.readouterr())

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert main(["train", "--resume", str(empty)]) == 2
    assert f"{empty}: an empty file" in one_error_line(capsys.readouterr())

    pickled = tmp_path / "yolov5.pt"
    torch.save(dict(model=yolo.build(TINY), epoch=3), pickled)  # what ultralytics/yolov5 writes
    assert main(["train", "--resume", str(pickled)]) == 2
    line = one_error_line(capsys.readouterr())
    assert f"{pickled}: holds pickled Python objects" in line and "\x1b" not in line

    assert main(["train", "--resume", str(good), "--name", "other"]) == 2
    assert "--name: --resume" in one_error_line(capsys.readouterr()) and not (tmp_path / "other").exists()


def test_resume_takes_the_backend_from_here_not_from_the_checkpoint(tmp_path, capsys, monkeypatch):
    # A run started on a GPU machine with --backend cuda resumes on a machine where cuda cannot run.
    torch.manual_seed(0)
    options = dict(cfg="tiny", data="synthetic", epochs=2, steps=1, batch_size=2, imgsz=32, nc=None, amp="none",
                   backend="cuda")
    last = train(yolo.build(TINY), epochs=2, steps_per_epoch=1, batch_size=2, img_size=32, save_dir=tmp_path / "run",
                 options=options, stop=lambda: True).last
    monkeypatch.setenv("MOBILEOPS_BACKEND", "torch")
    assert main(["train", "--resume", str(last), "--quiet"]) == 0, capsys.readouterr().err
    assert "(torch backend)" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "run" / "opt.yaml").read_text())["backend"] == "torch"


def test_save_period_writes_every_n_steps_and_exist_ok_appends(tmp_path, monkeypatch):
    import mobileops.yolo.checkpoint as checkpoint_lib

    written = []
    real_save = checkpoint_lib.save_checkpoint
    monkeypatch.setattr(checkpoint_lib, "save_checkpoint",
                        lambda state, path: written.append(state["step"]) or real_save(state, path))
    torch.manual_seed(0)
    train(yolo.build(TINY), epochs=2, steps_per_epoch=3, batch_size=2, img_size=32, save_dir=tmp_path, save_period=2)
    assert written == [2, 3, 4, 6]  # every 2 steps, and at each epoch end (3, 6)
    train(yolo.build(TINY), epochs=1, steps_per_epoch=1, batch_size=2, img_size=32, save_dir=tmp_path)
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["0", "3"], ["1", "6"], ["0", "1"]]  # the old rows are kept


def test_cli_run_folders_number_themselves(tmp_path, capsys):
    cfg = tiny_yaml(tmp_path)
    argv = ["train", "--cfg", str(cfg), "--img", "32", "--batch-size", "2", "--steps", "1", "--quiet",
            "--backend", "torch", "--project", str(tmp_path / "runs")]
    assert main(argv) == 0 and main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["exp", "exp2"]
    assert "results saved to" in capsys.readouterr().out
    options = yaml.safe_load((tmp_path / "runs" / "exp2" / "opt.yaml").read_text())
    assert options["imgsz"] == 32 and options["cfg"] == str(cfg) and options["save_dir"].endswith("exp2")
    header = (tmp_path / "runs" / "exp" / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["epoch", "step", "train/box_loss", "train/obj_loss", "train/cls_loss", "images/s"]
    assert "x/lr0" in header


def test_ctrl_c_saves_last_pt_exits_130_and_resumes(tmp_path, capsys):
    cfg = tiny_yaml(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOBILEOPS_BACKEND")}
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mobileops", "train", "--cfg", str(cfg), "--img", "32",
                                 "--batch-size", "2", "--epochs", "500", "--steps", "2", "--backend", "torch",
                                 "--device", "cpu", "--project", str(tmp_path / "runs")],
                                stdout=out, stderr=err, env=env, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 180
            while "loss box" not in err_path.read_text():  # a step has finished
                assert proc.poll() is None, err_path.read_text()
                assert time.monotonic() < deadline, "no training step finished within 180 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stdout, stderr = out_path.read_text(), err_path.read_text()
    assert code == 130, stdout + stderr
    assert "Traceback" not in stderr
    last = tmp_path / "runs" / "exp" / "weights" / "last.pt"
    naming = [line for line in (stdout + stderr).splitlines() if "last.pt" in line]
    assert len(naming) == 1 and str(last) in naming[0], stdout + stderr
    saved = torch.load(last, weights_only=True)
    assert 1 <= saved["step"] < 1000 and f"at step {saved['step']} of 1000" in naming[0]
    # Resume it (to the end of the next epoch only: --epochs may change on resume).
    epochs = saved["step"] // 2 + 1
    assert main(["train", "--resume", str(last), "--epochs", str(epochs), "--quiet"]) == 0
    assert torch.load(last, weights_only=True)["step"] == 2 * epochs
    assert f"resuming {last} at step {saved['step']}" in capsys.readouterr().out
    assert len((tmp_path / "runs" / "exp" / "results.csv").read_text().splitlines()) == 1 + epochs


# --- a step without host synchronisation; whole-step CUDA graphs; torch.compile ---------------------------------

@pytest.mark.parametrize("amp", ["none", "fp16", "bf16"])
def test_a_training_step_never_makes_the_host_wait(amp):
    torch.manual_seed(0)
    trainer = Trainer(yolo.build(TINY), img_size=32, amp=amp, max_targets=16)
    images, targets = synthetic_batch(2, 32, 2, generator=torch.Generator().manual_seed(1))
    trainer.step(images, targets)  # the first step makes the loss's constants and the scaler's state
    with ForbidHostSyncs():
        parts = trainer.step(images, targets)
    assert torch.isfinite(parts).all()


def test_the_probe_sees_the_unfused_optimizer_wait_for_the_scaler():
    # torch's SGD without fused=True makes GradScaler read found-inf on the host every step
    model = yolo.build(TINY)
    trainer = Trainer(model, img_size=32, amp="fp16")
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, targets = synthetic_batch(2, 32, 2, generator=torch.Generator().manual_seed(1))
    trainer.step(images, targets)
    with pytest.raises(HostSyncError, match="_local_scalar_dense"), ForbidHostSyncs():
        trainer.step(images, targets)


def test_fused_sgd_survives_a_skipped_first_step_like_the_unfused_one():
    # GradScaler skips a step whose gradients overflowed; the fused kernel then leaves momentum
    # buffers it created uninitialised, so make_optimizer starts them at zero.
    torch.manual_seed(0)
    model = yolo.build(TINY)
    reference = yolo.build(TINY)
    reference.load_state_dict(model.state_dict())
    fused = make_optimizer(model)
    assert fused.defaults["fused"]
    decay = [p for n, p in reference.named_parameters() if n.endswith(".weight") and p.dim() > 1]
    rest = [p for n, p in reference.named_parameters() if not (n.endswith(".weight") and p.dim() > 1)]
    unfused = torch.optim.SGD([dict(params=decay, weight_decay=5e-4), dict(params=rest, weight_decay=0.0)],
                              lr=0.01, momentum=0.937, nesterov=True, foreach=False)
    x = torch.rand(2, 3, 32, 32)
    for net, optimizer in ((model, fused), (reference, unfused)):
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
        for factor in (float("inf"), 1.0, 1.0):
            optimizer.zero_grad()
            scaler.scale(sum(o.float().square().mean() for o in net(x)) * factor).backward()
            scaler.step(optimizer)
            scaler.update()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_max_targets_pads_and_rejects_more():
    torch.manual_seed(0)
    trainer = Trainer(yolo.build(TINY), img_size=32, max_targets=8)
    images, targets = synthetic_batch(2, 32, 2, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(trainer.step(images, targets)).all()
    with pytest.raises(ValueError, match="the batch has 12 targets, more than the capacity of 8"):
        trainer.step(*synthetic_batch(3, 32, 2, generator=torch.Generator().manual_seed(1)))


def test_cuda_graph_and_compile_requests_that_cannot_work_say_why():
    model = yolo.build(TINY)
    with pytest.raises(ValueError, match="needs max_targets"):
        Trainer(model, cuda_graph=True)
    with pytest.raises(ValueError, match="captures CUDA graphs itself"):
        Trainer(model, cuda_graph=True, max_targets=8, compile="reduce-overhead")
    with pytest.raises(ValueError, match="compile must be one of"):
        Trainer(model, compile="fast")
    with pytest.raises(ValueError, match="max_targets must be"):
        Trainer(model, max_targets=-1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs the model on a CUDA device; it is on cpu"):
            Trainer(model, cuda_graph=True, max_targets=8)
        with pytest.raises(ValueError, match="needs the model on a CUDA device"):
            train(model, steps_per_epoch=1, batch_size=2, img_size=32, cuda_graph=True)


def test_compile_compiles_the_model_and_the_loss(monkeypatch):
    # inductor takes minutes on this CPU; aot_eager traces the same graphs
    modes, real_compile = [], torch.compile

    def compile_with_aot_eager(fn, mode=None):
        modes.append((type(fn).__name__, mode))
        return real_compile(fn, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    images, targets = synthetic_batch(2, 32, 2, generator=torch.Generator().manual_seed(1))
    results = []
    for compile_mode in (None, "max-autotune-no-cudagraphs"):
        torch.manual_seed(0)
        trainer = Trainer(yolo.build(TINY), img_size=32, compile=compile_mode, max_targets=16)
        results.append([trainer.step(images, targets) for _ in range(2)])
    assert modes == [("DetectionModel", "max-autotune-no-cudagraphs"), ("YOLOv5Loss", "max-autotune-no-cudagraphs")]
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend_name", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_graph_replayed_steps_are_bit_identical_to_eager_steps(backend_name, amp):
    from mobileops import backend as backends

    if backends._backend_problem(backend_name, torch.device("cuda")) is not None:
        pytest.skip(f"the {backend_name} backend is not available here")
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    batches = list(synthetic_batches(6, 4, 64, 2, seed=3))
    runs = []
    for cuda_graph in (False, True):
        torch.manual_seed(0)
        model = yolo.build(TINY).cuda().to(memory_format=torch.channels_last)
        trainer = Trainer(model, img_size=64, amp=amp, cuda_graph=cuda_graph, max_targets=16)
        with mobileops.use_backend(backend_name):
            parts = [trainer.step(i.cuda().contiguous(memory_format=torch.channels_last), t.cuda())
                     for i, t in batches]
        runs.append((torch.stack(parts), [p.detach().clone() for p in model.parameters()], trainer))
    (eager_parts, eager_params, _), (graph_parts, graph_params, graph_trainer) = runs
    assert graph_trainer._graph is not None  # captured after 3 warm-up steps, replayed for the last 3
    assert torch.equal(graph_parts, eager_parts)
    assert all(torch.equal(a, b) for a, b in zip(graph_params, eager_params))
    with pytest.raises(ValueError, match="a CUDA graph replays one shape"):
        graph_trainer.step(batches[0][0][:2].cuda(), batches[0][1][:8].cuda())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cli_cuda_graph_without_a_gpu_stops_with_one_line(capsys, tmp_path):
    assert main(["train", "--cuda-graph", "--quiet", "--steps", "1", "--batch-size", "2", "--img", "64",
                 "--project", str(tmp_path)]) == 2
    assert one_error_line(capsys.readouterr()) == \
        "error: --cuda-graph: CUDA graphs need a CUDA device; this run is on cpu (drop --cuda-graph)"
    assert not any(tmp_path.iterdir())  # stopped before making a run folder


def test_cli_compile_takes_an_optional_mode():
    from mobileops.__main__ import build_parser

    parse = build_parser().parse_args
    assert parse(["train", "--compile"]).compile == "default"
    assert parse(["train", "--compile", "max-autotune-no-cudagraphs"]).compile == "max-autotune-no-cudagraphs"
    assert parse(["train"]).compile is None and not parse(["train"]).cuda_graph
