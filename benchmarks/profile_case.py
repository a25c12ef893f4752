"""Where the time of a benchmark case goes: per implementation, wall time per iteration
(host included), summed GPU kernel time per iteration, and the kernels that take it.

    python benchmarks/profile_case.py --scope quick -k UIB:inference -k dwconv_bn_act:train_forward

Cases are those of :mod:`mobileops.bench.cases` whose ``group name`` contains every ``-k``
substring of one ``-k`` option (several ``-k`` options select the union). Needs a GPU.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mobileops.bench import cases


def _kernel_rows(prof, iterations: int, limit: int):
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events) / iterations
    rows = [f"      {e.self_device_time_total / iterations:9.1f} us  x{e.count // iterations:<3} {e.key[:90]}"
            for e in events[:limit]]
    return total, rows


def _host_profile(fn, iterations: int, limit: int) -> None:
    """The Python functions where the host time of ``iterations`` calls goes (cProfile)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(iterations):
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(limit)
    print("\n".join("      " + line for line in text.getvalue().splitlines()[-limit - 3:]))


def profile_case(case, device, iterations: int, limit: int, impls, host: bool = False) -> None:
    env = cases.setup(case, device, None)
    print(f"\n== {case.group} {case.name}")
    for name in cases.implementation_names(env):
        if impls and name not in impls:
            continue
        try:
            fn = cases.timed_function(case, env, name)
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(iterations):
                fn()
            torch.cuda.synchronize()
            wall_us = (time.perf_counter() - began) / iterations * 1e6
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(iterations):
                    fn()
                torch.cuda.synchronize()
        except Exception as error:  # report and go on: one broken implementation must not hide the rest
            print(f"  {name}: {type(error).__name__}: {str(error)[:300]}")
            continue
        gpu_us, rows = _kernel_rows(prof, iterations, limit)
        print(f"  {name}: wall {wall_us:.1f} us/iter, GPU kernels {gpu_us:.1f} us/iter")
        print("\n".join(rows))
        if host:
            _host_profile(fn, iterations, 2 * limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scope", default="quick", choices=cases.SCOPES)
    parser.add_argument("-k", action="append", default=[], help="substring of 'group name' (repeatable)")
    parser.add_argument("--impls", nargs="*", default=None, help="only these implementations")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--limit", type=int, default=8, help="kernels listed per implementation")
    parser.add_argument("--max-cases", type=int, default=6)
    parser.add_argument("--cprofile", action="store_true", help="also list the host-side Python hot spots")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_case.py needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    selected = [c for c in cases.all_cases(args.scope)
                if not args.k or any(key in f"{c.group} {c.name}" for key in args.k)]
    for case in selected[:args.max_cases]:
        profile_case(case, device, args.iterations, args.limit, args.impls, args.cprofile)


if __name__ == "__main__":
    main()
