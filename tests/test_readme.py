"""The README's and the docs' snippets work as written.

- Every fenced ``python`` block of README.md and docs/*.md runs, as it stands, in a fresh
  namespace (an ``...`` Ellipsis placeholder is fine: it is valid Python).
- Every command of a fenced ``bash`` block (README.md, docs/*.md, benchmarks/README.md,
  csrc/README.md) is checked: ``python -m mobileops ...`` is parsed with the CLI's own parser
  (``mobileops.__main__.build_parser``), and the cheap ones (``info``, ``check``) also run in a
  subprocess that must exit with 0; ``pytest`` / ``python -m pytest`` must name existing paths
  and known ``--bench-*`` options; ``python <script>.py`` must name an existing script; ``pip``
  lines cannot run here. Any other command fails the test until a check is added for it.
- ``python -m mobileops ...`` in inline code is parsed too, and relative links point to files
  and headings that exist.
- The install-and-test line that CI reads from the README (``.ci/run``) is exactly the
  documented one.

Optional parts written in brackets, like ``[--amp fp16|bf16]``, are not shell: a command is
checked without them, and then once with each of them (each ``a|b`` alternative in turn).
Placeholders like ``<cfg>`` are replaced by an example value from :data:`PLACEHOLDERS`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PYTHON_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_DOCS = PYTHON_DOCS + [ROOT / "benchmarks" / "README.md", ROOT / "csrc" / "README.md"]

#: The README's test command; CI runs the first README line starting like it (.ci/run).
TEST_COMMAND = 'pip install -e ".[test]" && python -m pytest tests benchmarks'
CI_PATTERN = re.compile(r'^pip install -e "\.\[test\]" && python -m pytest')

#: Subcommands cheap enough to run for real (seconds, no GPU, nothing written).
CHEAP = ("info", "check")

#: Example values for the placeholders the docs write in angle brackets.
PLACEHOLDERS = {"<cfg>": "yolov5n"}

#: pytest options taking a value (so that value is not taken for a path).
PYTEST_VALUE_OPTIONS = {"-k", "-m", "-p", "-n", "-o", "--durations", "--bench-scope", "--bench-out",
                        "--bench-compile-mode"}

_FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_INLINE_CLI = re.compile(r"`(python -m mobileops\b[^`\n]*)`")
_OPTIONAL = re.compile(r"(?<=\s)\[([^\[\]]*)\]")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def fenced_blocks(path: Path, language: str) -> list[tuple[str, int, str]]:
    """``(where, first line number, text)`` of each fenced block of ``language`` in ``path``."""
    text = path.read_text()
    return [(f"{_rel(path)}:{text.count(chr(10), 0, m.start()) + 2}", text.count("\n", 0, m.start()) + 2,
             m.group(2)) for m in _FENCE.finditer(text) if m.group(1) == language]


def shell_commands(block: str) -> list[str]:
    """The command lines of a bash block: continuations joined, blank and comment lines dropped."""
    lines, current = [], ""
    for raw in block.splitlines():
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip() and not current.lstrip().startswith("#"):
            lines.append(current.strip())
        current = ""
    return lines


def variants(line: str) -> list[str]:
    """``line`` without its bracketed optional parts, then with each part (and each ``a|b``
    alternative in it) put back in turn."""
    base = " ".join(_OPTIONAL.sub("", line).split())
    out = [base]
    for part in _OPTIONAL.findall(line):
        words = part.split()
        choices = [[w] if "|" not in w else w.split("|") for w in words]
        count = max(len(c) for c in choices)
        for i in range(count):
            chosen = " ".join(c[min(i, len(c) - 1)] for c in choices)
            out.append(f"{base.split('#')[0].rstrip()} {chosen}")
    return out


def split_commands(line: str) -> list[list[str]]:
    """Tokens of each command of a shell line (``&&`` / ``;`` separated; comments dropped)."""
    for placeholder, value in PLACEHOLDERS.items():
        line = line.replace(placeholder, value)
    if re.search(r"<[\w-]+>", line):
        raise AssertionError(f"unknown placeholder in {line!r}: add it to PLACEHOLDERS")
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", ";"):
            commands.append(current)
            current = []
        elif token and set(token) <= set("|&<>()"):
            raise AssertionError(f"{line!r}: shell operator {token!r} is not checked by tests/test_readme.py")
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def _parse_cli(argv: list[str], where: str):
    from mobileops.__main__ import build_parser

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{where}: `python -m mobileops {shlex.join(argv)}` does not parse "
                             f"(argparse exit {exc.code}; its message is above)") from None
    assert callable(getattr(args, "run", None)), f"{where}: {argv} parsed to no subcommand"
    return args


def _check_pytest(argv: list[str], where: str) -> None:
    conftest = (ROOT / "benchmarks" / "conftest.py").read_text()
    skip = False
    for token in argv:
        if skip:
            skip = False
            continue
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            if name.startswith("--bench-"):
                assert f'"{name}"' in conftest, f"{where}: pytest option {name} is not in benchmarks/conftest.py"
            skip = name in PYTEST_VALUE_OPTIONS and "=" not in token
            continue
        path = token.split("::", 1)[0]
        assert (ROOT / path).exists(), f"{where}: pytest path {path!r} does not exist"


def check_command(tokens: list[str], where: str) -> list[str] | None:
    """Check one command's tokens; return the argv after ``python -m mobileops`` when it
    should also run for real, else None."""
    if tokens[:3] == ["python", "-m", "mobileops"]:
        args = _parse_cli(tokens[3:], where)
        return tokens[3:] if args.command in CHEAP else None
    if tokens[0] == "pip":
        return None  # installs cannot run in a test; the test command line is checked exactly
    if tokens[:3] == ["python", "-m", "pytest"]:
        _check_pytest(tokens[3:], where)
    elif tokens[0] == "pytest":
        _check_pytest(tokens[1:], where)
    elif tokens[0] == "python" and len(tokens) > 1 and tokens[1].endswith(".py"):
        assert (ROOT / tokens[1]).is_file(), f"{where}: script {tokens[1]} does not exist"
    else:
        raise AssertionError(f"{where}: no check for the command {shlex.join(tokens)!r}; "
                             "add one to tests/test_readme.py")
    return None


def _all_shell_lines() -> list[tuple[str, str]]:
    return [(where, line) for path in SHELL_DOCS if path.is_file()
            for where, _, block in fenced_blocks(path, "bash") for line in shell_commands(block)]


PYTHON_BLOCKS = [(where, text) for path in PYTHON_DOCS for where, _, text in fenced_blocks(path, "python")]


@contextlib.contextmanager
def _restored_state():
    """Whatever a snippet selects (backend, default dtype, threads) does not leak out of it."""
    from mobileops import backend

    selected, stack = backend._selected, list(backend._override_stack)
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    try:
        yield
    finally:
        backend._selected = selected
        backend._override_stack[:] = stack
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)


def test_the_readme_has_python_and_bash_snippets():
    assert any(where.startswith("README.md") for where, _ in PYTHON_BLOCKS)
    assert any(where.startswith("README.md") for where, _ in _all_shell_lines())


@pytest.mark.parametrize("where, source", PYTHON_BLOCKS, ids=[w for w, _ in PYTHON_BLOCKS])
def test_python_snippet_runs_as_written(where, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a snippet writes lands in a scratch folder
    code = compile(source, where, "exec")
    with _restored_state(), torch.random.fork_rng():
        torch.manual_seed(0)
        torch.set_num_threads(1)  # small tensors: more threads only contend on a busy machine
        exec(code, {"__name__": "__readme__"})


def test_shell_commands_parse_and_the_cheap_ones_run():
    to_run: dict[str, tuple[str, list[str]]] = {}
    for where, line in _all_shell_lines():
        for variant in variants(line):
            for tokens in split_commands(variant):
                argv = check_command(tokens, f"{where}: {line}")
                if argv is not None:
                    to_run.setdefault(shlex.join(argv), (where, argv))
    assert to_run, "no cheap python -m mobileops command found to run"
    # All at once, one thread each: each pays the import of torch, which is most of its time.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {key: (where, subprocess.Popen([sys.executable, "-m", "mobileops", *argv], cwd=ROOT, env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for key, (where, argv) in to_run.items()}
    failures = []
    for key, (where, proc) in procs.items():
        output, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures.append(f"{where}: `python -m mobileops {key}` exited {proc.returncode}:\n{output[-2000:]}")
    assert not failures, "\n\n".join(failures)


def test_inline_cli_commands_parse():
    found = 0
    for path in SHELL_DOCS:
        if not path.is_file():
            continue
        text = _FENCE.sub("", path.read_text())
        for match in _INLINE_CLI.finditer(text):
            for variant in variants(match.group(1)):
                for tokens in split_commands(variant):
                    check_command(tokens, f"{_rel(path)}: `{match.group(1)}`")
                    found += 1
    assert found, "no inline python -m mobileops command found"


def test_the_test_command_is_the_one_ci_runs():
    readme = [line for where, line in _all_shell_lines() if where.startswith("README.md:")]
    ci_lines = [line for line in (ROOT / "README.md").read_text().splitlines() if CI_PATTERN.match(line)]
    assert ci_lines, f"README.md has no line starting like {TEST_COMMAND!r}"
    assert ci_lines[0] == TEST_COMMAND, f"CI would run {ci_lines[0]!r}; the documented command is {TEST_COMMAND!r}"
    assert TEST_COMMAND in readme, "the test command must stand in a README ```bash block"


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of the Markdown headings in ``path``."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", _FENCE.sub("", path.read_text()), re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


def test_relative_links_point_to_files_and_headings():
    broken = []
    for path in SHELL_DOCS + [ROOT / "benchmarks" / "NOTES.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", _FENCE.sub("", path.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # an external address
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists():
                broken.append(f"{_rel(path)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{_rel(path)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# ----------------------------------------------------------------------------- the checker itself

def test_optional_parts_and_alternatives_are_expanded():
    line = "python -m mobileops train --epochs 1 [--amp fp16|bf16] [--channels-last]"
    assert variants(line) == ["python -m mobileops train --epochs 1",
                              "python -m mobileops train --epochs 1 --amp fp16",
                              "python -m mobileops train --epochs 1 --amp bf16",
                              "python -m mobileops train --epochs 1 --channels-last"]
    assert variants('pip install -e ".[test]"') == ['pip install -e ".[test]"']


def test_the_checker_catches_broken_commands():
    with pytest.raises(AssertionError, match="does not parse"):
        check_command(split_commands("python -m mobileops info")[0], "here")  # cfg missing
    with pytest.raises(AssertionError, match="does not parse"):
        check_command(split_commands("python -m mobileops train --amp fp8")[0], "here")
    with pytest.raises(AssertionError, match="does not exist"):
        check_command(split_commands("python -m pytest tests nowhere")[0], "here")
    with pytest.raises(AssertionError, match="not in benchmarks"):
        check_command(split_commands("pytest benchmarks --bench-nothing")[0], "here")
    with pytest.raises(AssertionError, match="no check"):
        check_command(split_commands("make all")[0], "here")
    assert check_command(split_commands("python -m mobileops check  # comment")[0], "here") == ["check"]
    assert [t[0] for t in split_commands('pip install -e ".[test]" && python -m pytest tests')] == ["pip", "python"]
