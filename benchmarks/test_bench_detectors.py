"""pytest-benchmark cases: the detectors (see benchmarks/conftest.py and mobileops.bench.cases)."""

KIND = "detector"


def test_detector(case, bench_session, benchmark):
    bench_session.run(case, benchmark)
