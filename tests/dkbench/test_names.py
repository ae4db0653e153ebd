"""The bundled provider's name is spelled once, in `dkbench/names.py`; every other module under
dkbench/ imports it. A source scan fails on a second spelling; the program's name (the Typer app's,
a path such as share/dkbench, the package in an import, prose about the tool) is not the provider's
and stays."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from dkbench.measure.envinfo import TRITON_PROVIDERS
from dkbench.measure.providers import PROVIDERS
from dkbench.measure.providers.bundled import BundledKernel
from dkbench.measure.size_guard import INTERPRETED
from dkbench.names import BUNDLED_PROVIDER
from dkbench.spec import sweep

ROOT = Path(__file__).resolve().parents[2]
NAMES = ROOT / "dkbench" / "names.py"


def _program_names(tree: ast.AST) -> set[int]:
    """ids of the string constants that are the program's name where it looks like the
    provider's: the `name=` of a ``Typer(...)`` call and a part of a path joined with ``/``."""
    kept = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (
                getattr(node.func, "attr", getattr(node.func, "id", "")) == "Typer"):
            kept.update(id(k.value) for k in node.keywords if k.arg == "name")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            kept.update((id(node.left), id(node.right)))
    return kept


def provider_spellings(source: str, name: str = BUNDLED_PROVIDER) -> list[int]:
    """Line numbers of the string literals in ``source`` that spell the provider ``name``: the
    name alone, or one of its rows (``NAME+graph``). Prose that mentions the tool ("not wired
    into dkbench") is a longer string and is not one; f-strings' literal parts are checked too."""
    tree = ast.parse(source)
    kept = _program_names(tree)
    return sorted(node.lineno for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and id(node) not in kept
                  and (node.value == name or node.value.startswith(f"{name}+")))


def test_the_constant_is_the_bundled_providers_name() -> None:
    assert BundledKernel.name == BUNDLED_PROVIDER and PROVIDERS[BUNDLED_PROVIDER] is BundledKernel
    assert sweep.BUNDLED_PROVIDER == BUNDLED_PROVIDER
    assert TRITON_PROVIDERS == (BUNDLED_PROVIDER,) and INTERPRETED == {BUNDLED_PROVIDER}


def test_the_name_loads_no_torch_and_no_kernels() -> None:
    """The spec, the report and the measure stages all read it, and reading a results CSV for a
    report (`dkbench.report.density`) must load no kernels."""
    assert not [n for n in ast.walk(ast.parse(NAMES.read_text(encoding="utf-8")))
                if isinstance(n, (ast.Import, ast.ImportFrom))]
    probe = ("import sys, dkbench.names, dkbench.report.density; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'kernels'}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_the_scan_tells_the_provider_from_the_program() -> None:
    flagged = '\n'.join([
        'name = "dkbench"',
        'ours = frozenset({"dkbench"})',
        'meta = {"providers": ["dkbench"]}',
        'row = "dkbench+graph"',
        'label = f"{x}" + "dkbench"',
        "joined = 'dk' 'bench'",
    ])
    assert provider_spellings(flagged) == [1, 2, 3, 4, 5, 6]
    kept = '\n'.join([
        "import dkbench.spec",
        "from dkbench.names import BUNDLED_PROVIDER",
        'app = typer.Typer(name="dkbench", no_args_is_help=True)',
        'where = Path(sys.prefix) / "share" / "dkbench" / "sweeps"',
        'lock = ".dkbench.lock"',
        'thread = "dkbench-telemetry"',
        'why = "its fp8 path is not wired into dkbench; see the bf16 rows"',
        'title = f"### dkbench gate: {verdict}"',
        'help = "Combine the run directories with `dkbench merge`."',
        'mode = "dkbench_mode"',
    ])
    assert provider_spellings(kept) == []


def test_the_provider_is_spelled_once_under_dkbench() -> None:
    assert provider_spellings(NAMES.read_text(encoding="utf-8")) != []  # the scan sees the one
    found = [f"{path.relative_to(ROOT)}:{line}"
             for path in sorted((ROOT / "dkbench").rglob("*.py")) if path != NAMES
             for line in provider_spellings(path.read_text(encoding="utf-8"))]
    assert not found, ("the bundled provider's name spelled again (import BUNDLED_PROVIDER from "
                       "dkbench.names): " + ", ".join(found))
