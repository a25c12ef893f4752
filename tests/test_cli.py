"""``python -m mobileops info|check`` and the setup.py switches."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mobileops.__main__ import main
from mobileops.backend import implemented_ops

ROOT = Path(__file__).resolve().parents[1]


def test_info_prints_layer_table_and_totals(capsys):
    assert main(["info", "yolov5n", "--img", "320"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["from", "n", "params", "module"]
    rows = out[1:-1]
    assert len(rows) == 25 and rows[24].split()[0] == "24" and "Detect" in rows[24]
    assert rows[2].split()[:5] == ["2", "-1", "1", "4,800", "C3"]
    assert "1,872,157 parameters" in out[-1] and "at 320x320" in out[-1]


def test_info_fused_has_no_bn_parameters(capsys):
    assert main(["info", "yolov5n-c3uib", "--fuse", "--img", "320"]) == 0
    fused = capsys.readouterr().out.splitlines()[-1]
    assert main(["info", "yolov5n-c3uib", "--img", "320"]) == 0
    plain = capsys.readouterr().out.splitlines()[-1]
    count = lambda line: int(line.split(" parameters")[0].split()[-1].replace(",", ""))
    assert "(fused)" in fused and count(fused) < count(plain)


def test_info_reports_bad_configs(capsys):
    assert main(["info", "no-such-model"]) == 2
    assert "neither a file nor a shipped config" in capsys.readouterr().err


def test_check_lists_environment_and_backends(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out.splitlines()[0]
    for name in ("torch", "triton", "cuda"):
        assert any(line.split()[:1] == [name] and ("available" in line) for line in out.splitlines()), out
    assert "selected backend: auto" in out
    triton_line = next(line for line in out.splitlines() if line.startswith("  triton"))
    assert "implements: " + ", ".join(implemented_ops("triton")) in triton_line
    assert "dwconv_bn_act" in implemented_ops("triton")


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "mobileops", "check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torch" in proc.stdout and "available" in proc.stdout


@pytest.mark.parametrize("flag,code,message", [
    ("0", 0, "building without the CUDA extension"),
    ("maybe", 1, "MOBILEOPS_BUILD_CUDA must be 0 or 1"),
])
def test_setup_py_cuda_switch(flag, code, message):
    env = dict(os.environ, MOBILEOPS_BUILD_CUDA=flag)
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stdout + proc.stderr


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line.split("=", 1)[1].strip("'") for line in ci.splitlines() if line.startswith("TEST_COMMAND="))
    assert f"\n{command}\n" in (ROOT / "README.md").read_text()


def test_build_needs_a_source_checkout(monkeypatch, tmp_path, capsys):
    import mobileops

    monkeypatch.setattr(mobileops, "__file__", str(tmp_path / "site-packages" / "mobileops" / "__init__.py"))
    assert main(["build"]) == 2
    assert "needs a source checkout" in capsys.readouterr().err
