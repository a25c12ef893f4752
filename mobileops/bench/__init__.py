"""Benchmarks of the fused ops, blocks and detectors against eager PyTorch, eager with BN
folded and torch.compile (used by ``pytest benchmarks`` and ``python -m mobileops bench``).

- :mod:`mobileops.bench.cases`: what is timed (real layer shapes at 640, scopes, baselines)
- :mod:`mobileops.bench.timing`: timers, copy bandwidth, environment record
- :mod:`mobileops.bench.run`: one row per case, results files
- :mod:`mobileops.bench.report`: ``benchmarks/RESULTS.md`` and the speedup plot
"""
