"""Where the time of one detector training step goes, by phase and by kernel category.

    python benchmarks/profile_step.py [--cfg yolov5n-c3uib yolov5-mobilenetv3] [--batch 32] [--img 640]
                                      [--amp fp16] [--backend torch] [--cuda-graph]

Each detector takes a few warm-up steps of :class:`mobileops.yolo.train.Trainer`, then one step
under ``torch.profiler``, with the forward, the loss, the backward and the optimizer (SGD and
GradScaler) each marked and followed by a synchronisation. Without that synchronisation the
GPU would still be running one phase while the host issues the next, and no kernel could be
given to a phase. Per phase it prints the wall time, the kernel time (the union of its
kernels' intervals), the kernel count, and the idle time: the GPU waiting for the host,
launches and syncs. The kernels are also split into mobileops' fused kernels, BatchNorm and
activations, convolutions and the rest (:data:`CATEGORIES`).

The plain blocks (``--blocks plain``, the default) give the eager baseline. ``--blocks
mobileops --backend triton`` shows the fused kernels. One JSON line per detector ends the
output. Needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import re

import torch

#: Kernel-name patterns of each category (the first match wins), checked in this order.
CATEGORIES = (
    # mobileops' own: Triton kernels are named by their function (_stats_kernel, ...), the CUDA
    # extension's live in namespace mobileops
    ("fused", re.compile(r"^_\w+_kernel$|mobileops::")),
    ("bn_act", re.compile(r"batch_norm|batchnorm|bn_fw|bn_bw|welford|hardswish|hardsigmoid|silu|relu|sigmoid",
                          re.I)),
    ("conv", re.compile(r"conv|cudnn|implicit_gemm|xmma|wgrad|dgrad|fprop|winograd", re.I)),
)
PHASES = ("forward", "loss", "backward", "optimizer")


def category(kernel_name: str) -> str:
    """The category of a GPU kernel by name: ``fused`` (mobileops), ``bn_act``, ``conv`` or ``other``."""
    for name, pattern in CATEGORIES:
        if pattern.search(kernel_name):
            return name
    return "other"


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: the time at least one kernel ran."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def summarise(windows: dict[str, tuple[float, float]], kernels: list[tuple[str, float, float]]) -> dict:
    """Per phase (``windows``: name -> (start, end) in us) the wall, kernel-busy and idle time in
    ms, the kernel count and the kernel time per category. A kernel belongs to the phase in
    whose window it starts."""
    out = {}
    for phase, (begin, end) in windows.items():
        mine = [(name, start, stop) for name, start, stop in kernels if begin <= start < end]
        per_category: dict[str, float] = {}
        for name, start, stop in mine:
            per_category[category(name)] = per_category.get(category(name), 0.0) + (stop - start) / 1e3
        busy = busy_us([(start, stop) for _, start, stop in mine]) / 1e3
        wall = (end - begin) / 1e3
        out[phase] = dict(wall_ms=wall, kernel_ms=busy, idle_ms=max(wall - busy, 0.0), kernels=len(mine),
                          by_category_ms={k: round(v, 3) for k, v in sorted(per_category.items())})
    return out


def profile_step(cfg: str, batch: int, img: int, amp: str, blocks: str, backend: str, cuda_graph: bool,
                 warmup: int = 4) -> dict:
    import mobileops
    from mobileops import yolo
    from mobileops.yolo.train import BOXES_PER_IMAGE, Trainer, synthetic_batch

    torch.manual_seed(0)
    model = yolo.build(cfg, blocks=blocks).cuda().to(memory_format=torch.channels_last)
    trainer = Trainer(model, img_size=img, amp=amp, cuda_graph=cuda_graph, max_targets=batch * BOXES_PER_IMAGE)
    images, targets = synthetic_batch(batch, img, trainer.criterion.nc, generator=torch.Generator().manual_seed(0))
    images, targets = images.cuda().contiguous(memory_format=torch.channels_last), targets.cuda()
    with mobileops.use_backend(backend):
        for _ in range(warmup):
            trainer.step(images, targets)
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            if cuda_graph:
                with torch.profiler.record_function("step"):
                    trainer.step(images, targets)
                    torch.cuda.synchronize()
            else:
                _marked_step(trainer, images, targets)
    windows, kernels = {}, []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.append((event.name, event.time_range.start, event.time_range.end))
        elif event.name in PHASES + ("step",):
            windows[event.name] = (event.time_range.start, event.time_range.end)
    summary = summarise(windows, kernels)
    return dict(cfg=cfg, batch=batch, img=img, amp=amp, blocks=blocks, backend=backend, cuda_graph=cuda_graph,
                device=torch.cuda.get_device_name(), torch=torch.__version__, phases=summary,
                step_wall_ms=sum(p["wall_ms"] for p in summary.values()),
                step_idle_ms=sum(p["idle_ms"] for p in summary.values()))


def _marked_step(trainer, images, targets) -> None:
    """Trainer._step with each phase marked and synchronised (see the module docstring)."""
    from mobileops.yolo.train import AMP_DTYPES

    def phase(name):
        return torch.profiler.record_function(name)

    trainer.model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    dtype = AMP_DTYPES[trainer.amp]
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        with phase("forward"):
            predictions = trainer.model(images)
            torch.cuda.synchronize()
        with phase("loss"):
            loss, _ = trainer.criterion(predictions, targets)
            torch.cuda.synchronize()
    with phase("backward"):
        trainer.scaler.scale(loss).backward()
        torch.cuda.synchronize()
    with phase("optimizer"):
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", nargs="+", default=["yolov5n-c3uib", "yolov5-mobilenetv3"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img", type=int, default=640)
    parser.add_argument("--amp", choices=("none", "fp16", "bf16"), default="fp16")
    parser.add_argument("--blocks", choices=("plain", "mobileops"), default="plain")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--cuda-graph", action="store_true", help="profile one replay of the captured step")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    for cfg in args.cfg:
        result = profile_step(cfg, args.batch, args.img, args.amp, args.blocks, args.backend, args.cuda_graph)
        print(f"{cfg} b{args.batch} {args.img} {args.amp} {args.blocks}/{args.backend}"
              f"{' cuda-graph' if args.cuda_graph else ''}: step {result['step_wall_ms']:.1f} ms, "
              f"GPU idle {result['step_idle_ms']:.1f} ms")
        for phase, p in result["phases"].items():
            print(f"  {phase:9s} wall {p['wall_ms']:7.2f} ms  kernels {p['kernel_ms']:7.2f} ms ({p['kernels']:4d})  "
                  f"idle {p['idle_ms']:7.2f} ms  {p['by_category_ms']}")
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
