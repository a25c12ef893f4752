"""Measure cases side by side and collect the rows of a results file."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from mobileops.bench import cases as case_lib
from mobileops.bench import timing

#: Largest relative difference (max |a - b| / max |b|) allowed between an implementation's
#: outputs and eager's before its time is reported: a benchmark of a wrong result is void.
#: Wide enough for one rounding of the dtype through a deep network, far below a real bug.
#: Under autocast an implementation further from eager than this still passes when its own
#: difference from eager run in float32 is at most twice eager's plus this (see _disagreement).
AGREEMENT = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 1e-1}

#: The order in which baselines are compared against (ratios are baseline_time / impl_time).
BASELINES = ("eager", "eager_folded", "eager_graph", "compile")


def _relative_difference(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for a, b in zip(got, want):
        if a.shape != b.shape:
            return float("inf")
        scale = b.double().abs().max().clamp_min(1e-30)
        worst = max(worst, ((a.double() - b.double()).abs().max() / scale).item())
    return worst


def _disagreement(vs_eager: float, own_error: float | None, eager_error: float | None,
                  bound: float) -> str | None:
    """Why an implementation's outputs do not count as eager's, or None when they do.

    Within ``bound`` of eager passes. Otherwise, under autocast (``own_error`` and
    ``eager_error``: the implementation's and eager's differences from eager in float32), the
    flash-attention rule decides: no more than twice eager's own error plus ``bound``. A
    training-mode forward of a whole detector is the case for it: BatchNorm on batch
    statistics amplifies each layer's rounding, so eager itself lies several percent from the
    exact result (float16 autocast, yolov5n-c3uib at 640x640, batch 8, on a CPU: 7.3% from
    float64) and two correct implementations can be further apart than ``bound``."""
    if vs_eager <= bound:
        return None
    if own_error is None or eager_error is None:
        return f"output differs from eager by {vs_eager:.3g} (bound {bound})"
    if own_error <= 2 * eager_error + bound:
        return None
    return (f"output differs from eager by {vs_eager:.3g} (bound {bound}) and from float32 by {own_error:.3g}, "
            f"more than twice eager's {eager_error:.3g} plus {bound}")


def _agrees(row: dict, name: str, out: list[torch.Tensor], reference: list[torch.Tensor],
            exact: list[torch.Tensor] | None, eager_error: float | None, dtype: str) -> bool:
    """Records ``name``'s difference from eager (and from float32 under autocast) in ``row``;
    False, with the reason in ``row["errors"]``, when it does not count as eager's result."""
    diff = row["agreement"][name] = _relative_difference(out, reference)
    own = None
    if exact is not None:
        own = row["float32_difference"][name] = _relative_difference(out, exact)
    problem = _disagreement(diff, own, eager_error, AGREEMENT[dtype])
    if problem:
        row["errors"][name] = problem
    return problem is None


def _launch_bound(case: case_lib.Case) -> bool:
    """Batch-1 inference is dominated by launches: time it as CUDA-graph replays."""
    return case.batch == 1 and case.mode in ("inference", "forward")


def measure(case: case_lib.Case, device: torch.device, copy_bytes_per_s: float,
            compile_mode: str | None = None, env: case_lib.Setup | None = None) -> dict:
    """Time every implementation of ``case`` on ``device`` and return one results row.

    The row holds the case's fields, ``times_ms`` (median per implementation), ``spread_ms``
    (its fastest and slowest timed call, to show a noisy run), ``timed_calls``, ``timer``,
    ``agreement`` (each implementation's relative difference from eager), under autocast
    ``float32_difference`` (eager's and each implementation's from eager in float32), ``errors`` (an
    implementation that failed or disagreed, with the reason; it gets no time), the ratios
    ``<impl>_speedup_vs_<baseline>``, ``min_bytes`` and ``<impl>_fraction_of_copy`` where the
    mode has a byte floor, ``peak_memory_bytes`` per implementation for training modes on
    a GPU, and ``images_per_s`` per implementation for detectors. ``env`` reuses
    implementations already built with :func:`cases.setup`.
    """
    env = env if env is not None else case_lib.setup(case, device, compile_mode)
    if case.mode == "train_step":
        return _measure_train_steps(case, device, env)
    row = case.describe()
    row.update(times_ms={}, spread_ms={}, timed_calls={}, agreement={}, errors={}, min_bytes=env.min_bytes,
               timer=("cuda_graph" if _launch_bound(case) else "cuda_events") if device.type == "cuda"
               else "perf_counter_interleaved")
    reference = case_lib.first_output(case, env, "eager")
    exact = case_lib.float32_output(env)
    eager_error = None
    if exact is not None:
        eager_error = _relative_difference(reference, exact)
        row["float32_difference"] = {"eager": eager_error}
    ready, samples = {}, {}
    for name in env.impls:
        try:
            if name != "eager" and not _agrees(row, name, case_lib.first_output(case, env, name), reference, exact,
                                               eager_error, case.dtype):
                continue
            fn = case_lib.timed_function(case, env, name)
            if device.type == "cuda":
                if case.mode in ("backward", "forward_backward"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                    fn()
                    torch.cuda.synchronize()
                    row.setdefault("peak_memory_bytes", {})[name] = torch.cuda.max_memory_allocated(device)
                samples[name] = timing.cuda_samples_ms(fn, graph=_launch_bound(case))
            else:
                fn()  # fail here, per implementation, rather than inside the interleaved timing
                ready[name] = fn
        except Exception as exc:  # recorded in the row; one failure must not end the run
            row["errors"][name] = f"{type(exc).__name__}: {exc}"[:400]
    if ready:
        samples.update(timing.interleaved_cpu_samples_ms(ready))
    return _finish_row(case, row, samples, env.min_bytes, copy_bytes_per_s)


def _finish_row(case: case_lib.Case, row: dict, samples: dict[str, list[float]], min_bytes: int | None,
                copy_bytes_per_s: float) -> dict:
    """Adds the times, their spread, throughput and the ratios to ``row``."""
    for name, values in samples.items():
        row["times_ms"][name] = statistics.median(values)
        row["spread_ms"][name] = [min(values), max(values)]
        row["timed_calls"][name] = len(values)
    times = row["times_ms"]
    if case.kind == "detector":
        row["images_per_s"] = {name: case.batch / (ms * 1e-3) for name, ms in times.items()}
    baselines = dict(times)
    compiled = {name: ms for name, ms in times.items() if name.startswith("compile_")}
    if compiled:  # train steps time several compile modes: "compile" is the fastest of them
        row["best_compile"] = min(compiled, key=compiled.get)
        baselines["compile"] = compiled[row["best_compile"]]
    for name, ms in times.items():
        if not name.startswith("mobileops"):
            continue
        if min_bytes:
            row[f"{name}_fraction_of_copy"] = min_bytes / (ms * 1e-3) / copy_bytes_per_s
        for base in BASELINES:
            if base in baselines:
                row[f"{name}_speedup_vs_{base}"] = baselines[base] / ms
    return row


def _measure_train_steps(case: case_lib.Case, device: torch.device, env: case_lib.Setup) -> dict:
    """:func:`measure` for a detector train step: every implementation is built on its own
    (its peak memory is its own model, optimizer, activations and graph pool), runs
    :data:`~mobileops.bench.cases.TRAIN_CHECK_STEPS` steps from the same weights, and is timed
    only if its loss parts and state changes agree with eager's under the bench's rule."""
    row = case.describe()
    row.update(times_ms={}, spread_ms={}, timed_calls={}, agreement={}, errors={}, min_bytes=None,
               timer="cuda_events" if device.type == "cuda" else "perf_counter_interleaved",
               check_steps=case_lib.TRAIN_CHECK_STEPS)
    exact = case_lib.float32_train_trace(case, device)
    reference, eager_error, ready, samples = None, None, {}, {}
    for name, make in env.trainers.items():
        impl = None
        try:
            if name != "eager" and reference is None:
                row["errors"][name] = "not checked: eager, the reference, did not run"
                continue
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            impl = make()
            trace = impl.trace()
            if name == "eager":
                reference = trace
                if exact is not None:
                    eager_error = _relative_difference(trace, exact)
                    row["float32_difference"] = {name: eager_error}
            elif not _agrees(row, name, trace, reference, exact, eager_error, case.dtype):
                continue
            if device.type == "cuda":
                impl.step()
                torch.cuda.synchronize(device)
                row.setdefault("peak_memory_bytes", {})[name] = torch.cuda.max_memory_allocated(device) - base
                samples[name] = timing.cuda_samples_ms(impl.step)
            else:
                ready[name] = impl.step
        except Exception as exc:  # recorded in the row; one failure must not end the run
            row["errors"][name] = f"{type(exc).__name__}: {exc}"[:400]
        finally:
            if device.type == "cuda":
                del impl  # the next implementation's peak memory starts without this one
    if ready:
        samples.update(timing.interleaved_cpu_samples_ms(ready))
    return _finish_row(case, row, samples, None, 0.0)


class Progress:
    """A one-line progress bar on a stream (stderr by default); plain lines when not a tty."""

    def __init__(self, total: int, stream=None, width: int = 28):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        filled = self.width * self.done // max(1, self.total)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{elapsed:5.0f}s elapsed, ~{eta:4.0f}s left  {label}")
        if self.tty:
            self.stream.write("\r\033[K" + line[:150] + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def run_cases(selected: Iterable[case_lib.Case], device: torch.device, compile_mode: str | None = None,
              progress: bool = True, on_row: Callable[[dict], None] | None = None) -> dict:
    """Measure ``selected`` on ``device``; returns ``{environment, copy_bytes_per_s,
    compile_mode, rows}`` ready for :func:`write_results`.

    Ctrl-C (KeyboardInterrupt) stops the run at once: the case being measured is dropped, the
    rows measured before it are kept, and the document gets ``"interrupted": True``.

    Args:
        selected: the cases to measure, in order.
        device: where to run them.
        compile_mode: ``torch.compile`` mode of the compiled baseline (None: no compile baseline).
        progress: show a progress bar on stderr.
        on_row: called with each row as soon as it is measured.
    """
    selected = list(selected)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows: list[dict] = []
    copy_bps = None
    try:
        copy_bps = timing.copy_bandwidth(device)
        bar = Progress(len(selected)) if progress else None
        for case in selected:
            row = measure(case, device, copy_bps, compile_mode)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if bar is not None:
                bar.step(f"{case.group} {case.name}")
    except KeyboardInterrupt:
        if progress:
            sys.stderr.write("\n")
        document = results_document(device, copy_bps, compile_mode, rows)
        document["interrupted"] = True
        return document
    return results_document(device, copy_bps, compile_mode, rows)


def results_document(device: torch.device, copy_bytes_per_s: float, compile_mode: str | None,
                     rows: list[dict]) -> dict:
    """The JSON document of one run: environment header plus rows."""
    return dict(environment=timing.environment(device), copy_bytes_per_s=copy_bytes_per_s,
                compile_mode=compile_mode, rows=rows)


def results_path(folder: Path, document: dict) -> Path:
    """``<folder>/<device>-<date>.json``; a numbered suffix keeps earlier runs of the day."""
    env = document["environment"]
    slug = "".join(ch if ch.isalnum() else "-" for ch in env["device"]).strip("-").lower() or "device"
    path = Path(folder) / f"{slug}-{env['date'][:10]}.json"
    index = 2
    while path.exists():
        path = Path(folder) / f"{slug}-{env['date'][:10]}-{index}.json"
        index += 1
    return path


def write_results(document: dict, folder: Path, path: Path | None = None) -> Path:
    """Write ``document`` under ``folder`` (see :func:`results_path`) and return the path.
    ``path`` (one this function returned before) rewrites that file: a run that is stopped
    midway keeps the rows it measured."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = results_path(folder, document) if path is None else Path(path)
    path.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    return path


def _ratio_words(impl: str, baseline: str, speedup: float) -> str:
    """``speedup`` (baseline time / impl time) in words that say which way it runs."""
    if speedup >= 1:
        return f"{impl} {speedup:.2f}x faster than {baseline}"
    return f"{impl} {1 / speedup:.2f}x slower than {baseline}"


def summary_table(rows: list[dict]) -> str:
    """A plain-text report of rows: per case, every implementation's median time with its
    spread (fastest-slowest timed call) in milliseconds, errors, and mobileops' ratios
    against each baseline in words ("1.30x faster than eager")."""
    lines = ["times: median ms per call (fastest-slowest of n timed calls); each ratio is the baseline's median "
             "time over mobileops' median time"]
    for row in rows:
        lines.append(f"{row['group']}  {row['name']}")
        spread = row.get("spread_ms", {})
        calls = row.get("timed_calls", {})
        for name, ms in row["times_ms"].items():
            low, high = spread.get(name, (ms, ms))
            count = f", n={calls[name]}" if name in calls else ""
            lines.append(f"    {name:<22} {ms:10.3f} ms  ({low:.3f}-{high:.3f}{count})")
        for name, problem in row.get("errors", {}).items():
            lines.append(f"    {name:<22} not timed: {problem}")
        ratios = [_ratio_words(*key.split("_speedup_vs_"), value) for key, value in row.items()
                  if "_speedup_vs_" in key]
        if ratios:
            lines.append("    " + "; ".join(ratios))
    return "\n".join(lines)
