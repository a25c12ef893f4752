"""``pytest benchmarks``: every case of :mod:`mobileops.bench.cases` as a pytest-benchmark
test, grouped by op / block / detector and mode.

Each test times all implementations of its case side by side with the benchmark timers of
:mod:`mobileops.bench.timing` (CUDA events or graphs on a GPU), checks that each agrees with
eager, and records one results row; pytest-benchmark's own table shows the fastest mobileops
backend of each case, with every time and ratio in ``extra_info``. The rows are written to
``<device>-<date>.json`` after every case, so a run stopped midway keeps what it measured: by
default in pytest's temporary directory (a test run leaves the checkout as it was; the path
is printed at the end), with ``--bench-out benchmarks/results`` where results are kept, and
``--bench-out ''`` writes nothing.

Without CUDA the ``cpu`` scope runs and the GPU grid is listed as skipped with the reason.
"""

import pytest
import torch

from mobileops.bench import cases, run, timing

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def pytest_addoption(parser):
    group = parser.getgroup("mobileops benchmarks")
    group.addoption("--bench-scope", choices=cases.SCOPES, default=None,
                    help="grid to run: default 'default' on a GPU, 'cpu' without one")
    group.addoption("--bench-out", default=None,
                    help="folder for the results JSON (default: under pytest's temporary directory; "
                         "benchmarks/results to keep it; '' for none)")
    group.addoption("--bench-compile-mode", default="max-autotune-no-cudagraphs",
                    help="torch.compile mode of the compile baseline (GPU only)")
    group.addoption("--bench-no-compile", action="store_true", help="skip the torch.compile baseline")


def _scope(config):
    return config.getoption("--bench-scope") or ("default" if CUDA else "cpu")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    kind = metafunc.module.KIND
    scope = _scope(metafunc.config)
    selected = [c for c in cases.all_cases(scope) if c.kind == kind]
    if not CUDA and scope == "cpu":
        # List the GPU grid too, so a CPU run shows what it leaves out and why.
        selected += [c for c in cases.all_cases("default") if c.kind == kind]
    metafunc.parametrize("case", selected, ids=[f"{c.target}-{c.mode}-{c.name}" for c in selected])


class BenchSession:
    """The rows of this pytest session and what measuring them needs."""

    def __init__(self, config, out):
        self.compile_mode = None if (config.getoption("--bench-no-compile") or not CUDA) \
            else config.getoption("--bench-compile-mode")
        self.out = out
        self.rows = []
        self.path = None
        self._copy_bps = None
        if CUDA:
            torch.backends.cudnn.benchmark = True

    @property
    def copy_bytes_per_s(self):
        if self._copy_bps is None:
            self._copy_bps = timing.copy_bandwidth(DEVICE)
        return self._copy_bps

    def run(self, case, benchmark):
        """Measure ``case``, record its row, hand its fastest mobileops backend to
        pytest-benchmark, and fail if a mobileops implementation failed or disagreed."""
        if case.needs_cuda and not CUDA:
            pytest.skip("needs a CUDA device (the triton/cuda kernels and the GPU baselines)")
        env = cases.setup(case, DEVICE, self.compile_mode)
        row = run.measure(case, DEVICE, self.copy_bytes_per_s, self.compile_mode, env)
        self.rows.append(row)
        self.write()
        benchmark.group = case.group
        benchmark.extra_info.update(row)
        fused = [name for name in cases.implementation_names(env) if name.startswith("mobileops")]
        assert fused, f"no mobileops backend can run {case.group} on {DEVICE.type}"
        broken = {name: row["errors"][name] for name in fused if name in row["errors"]}
        assert not broken, f"{case.group} {case.name}: {broken}"
        fastest = min(fused, key=lambda name: row["times_ms"][name])
        fn = cases.timed_function(case, env, fastest)

        def synchronized():
            fn()
            if CUDA:
                torch.cuda.synchronize()

        benchmark.pedantic(synchronized, rounds=20 if CUDA else 3, warmup_rounds=1)

    def write(self):
        if self.rows and self.out:
            document = run.results_document(DEVICE, self.copy_bytes_per_s, self.compile_mode, self.rows)
            self.path = run.write_results(document, self.out, self.path)
        return self.path


@pytest.fixture(scope="session")
def bench_session(request, tmp_path_factory):
    out = request.config.getoption("--bench-out")
    if out is None:
        out = str(tmp_path_factory.mktemp("bench-results"))
    session = BenchSession(request.config, out)
    yield session
    path = session.write()
    if path is not None:
        print(f"\nmobileops benchmark rows written to {path}")
