"""pytest-benchmark cases: the ops (see benchmarks/conftest.py and mobileops.bench.cases)."""

KIND = "op"


def test_op(case, bench_session, benchmark):
    bench_session.run(case, benchmark)
