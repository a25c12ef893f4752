"""``python -m mobileops``: info, check, the one-line errors, --help, bench on Ctrl-C; the setup.py switches."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import one_error_line

from mobileops.__main__ import build_parser, main
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
    # .ci/run's own extraction line, run as CI runs it, finds the README's documented command
    ci = (ROOT / ".ci" / "run").read_text()
    (extract,) = [line for line in ci.splitlines() if line.startswith("TEST_COMMAND=")]
    found = subprocess.run(["bash", "-c", f'{extract}\nprintf %s "$TEST_COMMAND"'], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout
    assert found == 'pip install -e ".[test]" && python -m pytest tests benchmarks'
    assert f"\n{found}\n" in (ROOT / "README.md").read_text()


def test_build_needs_a_source_checkout(monkeypatch, tmp_path, capsys):
    import mobileops

    monkeypatch.setattr(mobileops, "__file__", str(tmp_path / "site-packages" / "mobileops" / "__init__.py"))
    assert main(["build"]) == 2
    assert "needs a source checkout" in capsys.readouterr().err


def test_help_lists_every_subcommand_and_train_shows_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "check", "bench", "train", "build"):
        assert f"\n    {command} " in out, out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("--epochs EPOCHS number of epochs (default: 1)", "(default: 320)", "(default: runs/train)",
                  "--resume [PATH]", "--save-period", "--exist-ok", "--img IMGSZ, --imgsz IMGSZ, --img-size IMGSZ"):
        assert shown in out, shown


@pytest.mark.parametrize("command", ["info", "train"])
def test_image_size_flag_is_the_same_everywhere(command):
    head = ["info", "yolov5n"] if command == "info" else ["train"]
    for flag in ("--img", "--imgsz", "--img-size"):
        assert build_parser().parse_args(head + [flag, "64"]).imgsz == 64


NO_TRITON = {"TRITON_INTERPRET": None}  # this machine (no CUDA) without the interpreter: triton cannot run


@pytest.mark.parametrize("argv,env,names", [
    (["train", "--img-size", "0"], {}, "--img 0"),
    (["train", "--img-size", "-32"], {}, "--img -32"),
    (["train", "--img", "48"], {}, "--img 48"),
    (["train", "--device", "gpu0"], {}, "--device gpu0"),
    (["train", "--nc", "0"], {}, "--nc"),
    (["train", "--backend", "triton"], NO_TRITON, "--backend triton"),
    (["train"], dict(NO_TRITON, MOBILEOPS_BACKEND="triton"), "MOBILEOPS_BACKEND=triton"),
    (["info", "yolov5n", "--img", "0"], {}, "--img 0"),
    (["info", "yolov5n", "--img", "-32"], {}, "--img -32"),
    (["info", "yolov5n"], dict(NO_TRITON, MOBILEOPS_BACKEND="triton"), "MOBILEOPS_BACKEND=triton"),
    (["bench", "--device", "gpu0", "--no-save"], {}, "--device gpu0"),
    (["bench", "--no-save"], dict(NO_TRITON, MOBILEOPS_BACKEND="triton"), "MOBILEOPS_BACKEND=triton"),
])
def test_bad_values_get_one_line_naming_the_flag(argv, env, names, monkeypatch, capsys):
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured)
    assert names in line, captured.err
    assert captured.out == ""  # info fails before printing its table
    allowed = {"--img": "multiple of 32", "--device": "allowed: cpu, cuda", "--backend": "usable here: auto, torch",
               "--nc": "expected a positive integer",
               "MOBILEOPS_BACKEND": "usable here: auto, torch"}
    assert allowed[names.split()[0].split("=")[0]] in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "bench"])
def test_cuda_device_without_cuda_is_a_one_line_error(command, capsys):
    assert main([command, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda: CUDA is not available here" in err and "--device cpu" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where triton cannot run (no CUDA)")
def test_check_fails_when_the_selected_backend_cannot_run_here():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MOBILEOPS_BACKEND"] = "triton"
    proc = subprocess.run([sys.executable, "-m", "mobileops", "check"], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "selected backend: triton (unusable here: no CUDA device" in proc.stdout
    assert proc.stderr.startswith("error: the selected backend triton") and "Traceback" not in proc.stderr


def test_bench_ctrl_c_keeps_and_writes_the_rows_measured(monkeypatch, tmp_path, capsys):
    from mobileops.bench import cases, run, timing

    def case(name):
        return SimpleNamespace(kind="op", group="dwconv_bn_act", name=name,
                               describe=lambda: dict(kind="op", group="dwconv_bn_act", name=name))

    measured = []

    def measure(case, *args, **kwargs):  # the second case is interrupted while it is being measured
        if measured:
            raise KeyboardInterrupt
        measured.append(case)
        return dict(case.describe(), times_ms={"eager": 1.0}, errors={})

    monkeypatch.setattr(cases, "all_cases", lambda scope: [case("first"), case("second"), case("third")])
    monkeypatch.setattr(run, "measure", measure)
    monkeypatch.setattr(timing, "copy_bandwidth", lambda device: 1e9)
    assert main(["bench", "--kinds", "op", "--quiet", "--out", str(tmp_path)]) == 130
    captured = capsys.readouterr()
    written = list(tmp_path.glob("*.json"))
    assert len(written) == 1 and f"wrote {written[0]}" in captured.out
    document = json.loads(written[0].read_text())
    assert document["interrupted"] is True and [r["name"] for r in document["rows"]] == [measured[0].name]
    assert "interrupted: kept the 1 of 3 cases measured" in captured.err and "Traceback" not in captured.err
