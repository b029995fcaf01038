"""The command line as a new user meets it: help, one-line errors, no spawned processes on a bad
config, and a package without import circles or production imports of `testing/`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_keye.config.arguments import config_help, split_recipe_args
from megatron_keye.config.loading import ConfigError

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_keye"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "megatron_keye.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_train_help_lists_every_field_with_default_and_doc():
    result = cli("train", "--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("usage: megatron-keye train")
    for field in ("--model.make_vocab_size_divisible_by", "--parallel.virtual_pipeline",
                  "--schedule.exit_at_iteration", "--checkpoint.optimizer_format",
                  "--stage.freeze", "--precision", "--seed"):
        assert field in out, field
    # type, default and the one-line doc of a field
    assert "--schedule.train_iters  (int, default 100)" in out
    assert "optimizer steps in the planned schedule" in out


@pytest.mark.parametrize("command", ["config", "convert", "demo"])
def test_every_subcommand_answers_help(command):
    result = cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()
    assert "Traceback" not in result.stderr


def test_config_help_documents_every_field():
    text = config_help()
    undocumented = [line for line, nxt in zip(text.splitlines(), text.splitlines()[1:] + [""])
                    if line.startswith("  --") and not nxt.startswith("      ")]
    assert undocumented == [], undocumented


def test_config_error_is_one_line_before_any_process_starts():
    start = time.perf_counter()
    result = cli("train", "--nproc", "4", "--recipe", "tiny-cpu-text",
                 "--schedule.train_iters=3")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: schedule.warmup_iters: 20 exceeds schedule.train_iters (3)"]
    assert "torch.distributed" not in result.stdout + result.stderr
    assert time.perf_counter() - start < 60


def test_layout_error_names_the_field():
    result = cli("train", "--nproc", "3", "--recipe", "tiny-cpu-text")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: parallel")
    assert "parallel.tensor" in result.stderr


def test_unknown_argument_is_one_line():
    result = cli("train", "--bogus")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --bogus: unknown argument; overrides look like --section.field=value "
        "(--help lists them)"
    )


def test_missing_hf_dir_is_one_line(tmp_path):
    missing = tmp_path / "nope"
    result = cli("convert", "import", "--hf-dir", str(missing), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


def test_split_recipe_args():
    assert split_recipe_args(["--recipe", "r", "--a.b=1", "--c.d", "2"]) == ("r", ["a.b=1", "c.d=2"])
    with pytest.raises(ConfigError, match="--recipe: needs a value"):
        split_recipe_args(["--recipe"])


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.startswith("megatron_keye")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_production_code_never_imports_testing():
    offenders = [
        str(p) for p in PACKAGE.rglob("*.py")
        if "testing" not in p.relative_to(PACKAGE).parts
        and any(n.startswith("megatron_keye.testing") for n in _imports(p))
    ]
    assert offenders == []


def test_no_import_cycles_between_modules():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # `from a.b import c` names either module a.b.c or an attribute of a.b
            target = imported if imported in modules else imported.rsplit(".", 1)[0]
            if target in modules and target != name and not name.startswith(target + "."):
                targets.add(target)
        graph[name] = targets
    cycles = []

    def visit(node, stack, on_stack, done):
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt in on_stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack, on_stack, done)
        on_stack.discard(stack.pop())
        done.add(node)

    done: set[str] = set()
    for node in sorted(graph):
        if node not in done:
            visit(node, [], set(), done)
    # Package __init__ re-exports are not real cycles; every other cycle is.
    real = [c for c in cycles if not any(m.count(".") < 2 and m in c[:-1] and
                                         modules[m].name == "__init__.py" for m in c)]
    assert real == [], real
