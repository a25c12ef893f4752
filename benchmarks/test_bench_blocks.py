"""pytest-benchmark cases: the blocks (see benchmarks/conftest.py and mobileops.bench.cases)."""

KIND = "block"


def test_block(case, bench_session, benchmark):
    bench_session.run(case, benchmark)
