"""The benchmark script runs end to end (its CPU subset here) and writes well-formed rows."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dwconv_bn_act.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is the benchmark itself, not a test")
def test_dwconv_bench_script_cpu_subset(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_dwconv_bn_act", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    layers = bench.detector_layers()
    assert len(layers) == len({layer for layer, _ in layers}) >= 20
    assert bench.main(["--out", str(tmp_path), "--layers", "0"]) == 0
    (path,) = tmp_path.glob("dwconv_bn_act-*.json")
    result = json.loads(path.read_text())
    assert result["environment"]["torch"] == torch.__version__ and result["copy_bytes_per_s"] > 0
    (row,) = result["rows"]
    assert set(row["times_ms"]) == {"eager", "eager_folded", "mobileops_torch"} and not row["errors"]
    c, h, w, k, stride, _ = layers[0][0]
    assert row["min_bytes"] == 2 * c * h * w * 4 and (row["kernel"], row["stride"]) == (k, stride)
    times = row["times_ms"]
    assert row["mobileops_torch_speedup_vs_eager"] == pytest.approx(times["eager"] / times["mobileops_torch"])
