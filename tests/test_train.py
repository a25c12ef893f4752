"""The training loop (mobileops.yolo.train) and ``python -m mobileops train``."""

import math

import pytest
import torch

import mobileops
from mobileops import yolo
from mobileops.__main__ import main
from mobileops.yolo.train import Trainer, synthetic_batch, synthetic_batches, train


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


def test_cli_train_runs_end_to_end(capsys):
    assert main(["train", "--cfg", "yolov5n-c3uib", "--data", "synthetic", "--epochs", "1", "--steps", "2",
                 "--batch-size", "2", "--img-size", "64", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "loss" in out


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
