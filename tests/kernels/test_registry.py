"""The kernel registry: its records name real modules, the cache's source hash follows exactly
those modules, the shipped configs carry today's hashes, and the public API holds (everything the
harness imports is there; kernels never imports dkbench)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import kernels
from kernels import KERNELS, KernelRecord, select
from kernels.attention import CONFIG_ARGUMENTS
from kernels.config_cache import load_shipped
from kernels.configs import IMPLS
from kernels.registry import TUNABLE

ROOT = Path(__file__).resolve().parents[2]
KERNELS_DIR = ROOT / "kernels"
HASHED = sorted({module for record in KERNELS.values() for module in record.sources})


# -- the records -----------------------------------------------------------------------------------


def test_records_are_keyed_by_name_in_a_fixed_order() -> None:
    assert list(KERNELS) == ["fwd", "bwd", "dq", "varlen", "decode"]
    for name, record in KERNELS.items():
        assert isinstance(record, KernelRecord) and record.name == name
        assert record.description and "\n" not in record.description, name
    with pytest.raises(dataclasses.FrozenInstanceError):
        KERNELS["fwd"].tunable = False  # type: ignore[misc]


def test_tuned_kernels_hash_todays_modules_in_todays_order() -> None:
    """The shipped configs are keyed on these hashes: a change here (even of order) drops them."""
    assert KERNELS["fwd"].sources == ("kernels.fwd", "kernels.fwd_ws", "kernels.schedule")
    assert KERNELS["bwd"].sources == KERNELS["dq"].sources == ("kernels.bwd",)


@pytest.mark.parametrize("name", list(KERNELS))
def test_sources_import_and_exist(name: str) -> None:
    for module_name in KERNELS[name].sources:
        module = importlib.import_module(module_name)
        path = Path(module.__file__ or "")
        assert path.is_file() and path.parent == KERNELS_DIR, (name, module_name, path)


def _jit_functions(module: object) -> dict[str, object]:
    return {attr: value for attr, value in vars(module).items()
            if isinstance(value, (JITFunction, InterpretedFunction))}


@pytest.mark.parametrize("name", list(KERNELS))
def test_sources_cover_every_jit_function_the_kernel_uses(name: str) -> None:
    """A jit helper taken from a module outside the sources (varlen's loop is the forward's
    _attn_fwd_inner) would change the kernel without changing its hash."""
    sources = KERNELS[name].sources
    defining = importlib.import_module(sources[0])
    assert any(fn.fn.__module__ == sources[0] for fn in _jit_functions(defining).values()), \
        f"{sources[0]} defines no jit kernel for {name!r}"
    for module_name in sources:
        for attr, fn in _jit_functions(importlib.import_module(module_name)).items():
            assert fn.fn.__module__ in sources, (
                f"{name}: {module_name}.{attr} comes from {fn.fn.__module__}, which "
                f"KERNELS[{name!r}].sources does not hash")


def test_implementations_config_arguments_and_tunable() -> None:
    params = inspect.signature(kernels.sparse_attention).parameters
    for name, record in KERNELS.items():
        assert "triton" in record.impls and set(record.impls) <= set(IMPLS), name
        if record.config_argument is not None:
            assert params[record.config_argument].default is None, name
        # A tuned kernel's winner must be pinnable, or the tuner could not time it.
        assert not record.tunable or record.config_argument is not None, name
    assert KERNELS["fwd"].impls == ("triton", "gluon")
    assert CONFIG_ARGUMENTS == {"fwd": "config", "bwd": "bwd_config", "dq": "dq_config"}
    assert TUNABLE == ("fwd", "bwd", "dq")


# -- the source hash -------------------------------------------------------------------------------


@pytest.fixture
def fresh_hashes():
    """kernel_hash is memoised: clear it around a test that edits sources, so no other test
    sees an edited hash."""
    select.kernel_hash.cache_clear()
    yield
    select.kernel_hash.cache_clear()


def _edit_source(monkeypatch: pytest.MonkeyPatch, module_name: str) -> None:
    """``inspect.getsource`` (what source_hash reads) returns an edited text for one module."""
    target = importlib.import_module(module_name)
    original = inspect.getsource

    def getsource(obj):
        text = original(obj)
        return text + "\n# edited\n" if obj is target else text

    monkeypatch.setattr(inspect, "getsource", getsource)


def _hashes() -> dict[str, str]:
    select.kernel_hash.cache_clear()
    return {name: select.kernel_hash(name) for name in KERNELS}


@pytest.mark.parametrize("module_name", HASHED)
def test_kernel_hash_changes_exactly_for_the_kernels_hashing_an_edited_module(
        module_name: str, monkeypatch: pytest.MonkeyPatch, fresh_hashes) -> None:
    before = _hashes()
    assert _hashes() == before  # stable while nothing changes
    _edit_source(monkeypatch, module_name)
    after = _hashes()
    changed = {name for name in KERNELS if after[name] != before[name]}
    assert changed == {name for name, r in KERNELS.items() if module_name in r.sources}
    assert changed, f"editing {module_name} changed no kernel's hash"


def test_forward_hash_follows_the_schedule_and_backward_hash_its_module(
        monkeypatch: pytest.MonkeyPatch, fresh_hashes) -> None:
    before = _hashes()
    with monkeypatch.context() as patch:
        _edit_source(patch, "kernels.schedule")
        after = _hashes()
    assert after["fwd"] != before["fwd"]
    assert (after["bwd"], after["dq"]) == (before["bwd"], before["dq"])
    _edit_source(monkeypatch, "kernels.bwd")
    after = _hashes()
    assert after["fwd"] == before["fwd"]
    assert after["bwd"] != before["bwd"] and after["dq"] != before["dq"]


# -- the shipped configs ---------------------------------------------------------------------------


def test_shipped_configs_carry_the_current_kernel_hashes() -> None:
    files = sorted((KERNELS_DIR / "tuned").glob("*.json"))
    assert files, "no shipped tuned configs"
    stale = []
    for file in files:
        entries = load_shipped(file)
        assert entries, f"{file.name} holds no entries"
        for key_str, entry in entries.items():
            kernel, shipped = entry["key"]["kernel"], entry["key"]["kernel_hash"]
            assert kernel in KERNELS, f"{file.name}: {key_str} is for unknown kernel {kernel!r}"
            now = select.kernel_hash(kernel)
            if shipped != now:
                stale.append(f"{file.name}: {kernel} entry {key_str} was tuned for kernel_hash "
                             f"{shipped}, but {', '.join(KERNELS[kernel].sources)} now hash to "
                             f"{now}")
    assert not stale, ("the shipped configs no longer match the kernel sources, so they are "
                       "ignored at launch: re-tune the kernel (benchmarks/reproduce.sh OUT tune) "
                       "and reship kernels/tuned/\n" + "\n".join(stale))


# -- the public API --------------------------------------------------------------------------------


def test_registry_is_exported() -> None:
    assert "KERNELS" in kernels.__all__ and kernels.KERNELS is KERNELS
    for name in kernels.__all__:
        assert hasattr(kernels, name), name


def _python_files(*dirs: Path) -> list[Path]:
    return sorted(path for d in dirs for path in d.rglob("*.py"))


def _kernels_imports() -> set[tuple[str, str | None]]:
    """(module, name) for every ``from kernels... import name`` and ``import kernels...`` in the
    harness, inside functions too."""
    found: set[tuple[str, str | None]] = set()
    for path in [*_python_files(ROOT / "dkbench"), ROOT / "cli.py"]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module and (
                    node.module == "kernels" or node.module.startswith("kernels.")):
                found.update((node.module, alias.name) for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update((alias.name, None) for alias in node.names
                             if alias.name.split(".")[0] == "kernels")
    return found


def test_every_name_the_harness_imports_from_kernels_is_there() -> None:
    imports = _kernels_imports()
    assert ("kernels", "KERNELS") in imports  # the harness reads the registry
    for module_name, name in sorted(imports, key=str):
        module = importlib.import_module(module_name)
        if name is None or hasattr(module, name):
            continue
        # ``from kernels import fwd`` names a submodule.
        importlib.import_module(f"{module_name}.{name}")


def test_kernels_source_never_imports_dkbench() -> None:
    offenders = []
    for path in _python_files(KERNELS_DIR):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif (isinstance(node, ast.Call) and node.args
                  and isinstance(node.args[0], ast.Constant)
                  and getattr(node.func, "attr", getattr(node.func, "id", "")) in
                  ("import_module", "__import__")):
                names = [str(node.args[0].value)]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}"
                          for n in names if n.split(".")[0] == "dkbench"]
    assert not offenders, "\n".join(offenders)


def test_importing_every_kernels_module_loads_no_dkbench() -> None:
    modules = [f"kernels.{p.stem}" for p in sorted(KERNELS_DIR.glob("*.py"))
               if p.stem != "__init__"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'dkbench'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
