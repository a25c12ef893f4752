"""DistributedDataParallel over the fused blocks: two CPU processes (gloo) against one process
computing what DDP promises (gradients averaged over the ranks' shards, buffers broadcast from
rank 0 before each forward), in float64."""

import copy
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import randomize_bn
from torch import nn

import mobileops

STEPS, WORLD = 2, 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(mobileops.Conv(3, 8, 3, 2), mobileops.C3_UIB(8, 16, 1),
                          mobileops.MobileNetv3(16, 16, 32, 3, 1, True, True))
    return randomize_bn(model).double()


def _batch() -> torch.Tensor:
    return torch.randn(2 * WORLD, 3, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()


def _worker(rank: int, store_path: str, backend_name: str, train: bool, out_path: str) -> None:
    # a file store: no TCP store server in rank 0 that could exit while rank 1 still talks to it
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    mobileops.set_backend(backend_name)
    model = nn.parallel.DistributedDataParallel(_model().train(train))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    shard = _batch().chunk(WORLD)[rank]
    for _ in range(STEPS):
        optimizer.zero_grad()
        _loss(model(shard)).backward()
        optimizer.step()
    if rank == 0:
        grads = [p.grad for p in model.module.parameters()]
        torch.save(dict(state=model.module.state_dict(), grads=grads), out_path)
    dist.barrier()
    # Leave without process-group teardown: a rank whose peer has already exited was seen to
    # hang there. Everything this test needs is on disk once both ranks pass the barrier.
    os._exit(0)


def _run_ranks(args: tuple, timeout_s: float = 240.0) -> None:
    """mp.spawn with a deadline: a hung rank fails the test instead of stalling the suite."""
    context = mp.start_processes(_worker, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP ranks did not finish within {timeout_s:.0f} s")


def _single_process(backend_name: str, train: bool):
    """DDP's semantics in one process: per step, every shard runs on a copy with rank 0's buffers,
    the gradients are averaged, and rank 0's buffer updates are kept."""
    model = _model().train(train)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    shards = _batch().chunk(WORLD)
    with mobileops.use_backend(backend_name):
        for _ in range(STEPS):
            replicas = [copy.deepcopy(model) for _ in shards]
            for replica, shard in zip(replicas, shards):
                _loss(replica(shard)).backward()
            optimizer.zero_grad()
            for p, *copies in zip(model.parameters(), *(r.parameters() for r in replicas)):
                p.grad = sum(c.grad for c in copies) / WORLD
            for b, b0 in zip(model.buffers(), replicas[0].buffers()):
                b.copy_(b0)
            optimizer.step()
    return model


# The blocks run through the op layer on the torch backend here: DDP's hooks, buckets and buffer
# broadcasts see the same modules whatever backend computes the ops (the kernels' autograd is
# tested op by op and per detector); the interpreted triton backend would add a minute to CI.
@pytest.mark.parametrize("backend_name", ["torch"])
@pytest.mark.parametrize("train", [True, False], ids=["train-bn", "frozen-bn"])
def test_ddp_matches_a_single_process_run(tmp_path, backend_name, train):
    out_path = str(tmp_path / "rank0.pt")
    _run_ranks((str(tmp_path / "store"), backend_name, train, out_path))
    ddp = torch.load(out_path, weights_only=True)
    reference = _single_process(backend_name, train)
    for (name, want), got in zip(reference.state_dict().items(), ddp["state"].values()):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
    for p, got in zip(reference.parameters(), ddp["grads"]):
        torch.testing.assert_close(got, p.grad, rtol=1e-9, atol=1e-11)
    if not train:
        # frozen BatchNorm: averaging shard gradients is the gradient of the whole batch
        whole = _model().eval()
        with mobileops.use_backend(backend_name):
            _loss(whole(_batch())).backward()
        first = _model().eval()
        shard_grads = []
        with mobileops.use_backend(backend_name):
            for shard in _batch().chunk(WORLD):
                first.zero_grad()
                _loss(first(shard)).backward()
                shard_grads.append([p.grad.clone() for p in first.parameters()])
        for p, *per_shard in zip(whole.parameters(), *shard_grads):
            torch.testing.assert_close(sum(per_shard) / WORLD, p.grad, rtol=1e-9, atol=1e-12)


def test_sync_batchnorm_conversion_keeps_the_blocks_working():
    """convert_sync_batchnorm swaps the BatchNorm2d modules for SyncBatchNorm: the blocks then run
    those layers unfused (conv, SyncBatchNorm, activation) with SyncBatchNorm's semantics. In
    eval mode (no process group needed) the outputs are unchanged."""
    model = _model().eval()
    x = _batch()
    want = model(x)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert list(synced.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(synced(x), want, rtol=1e-12, atol=1e-12)

