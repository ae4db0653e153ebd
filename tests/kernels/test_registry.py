"""The kernel registry: its records name real modules, the cache's source hash follows exactly
those modules, the shipped configs carry today's hashes, and the public API holds (everything the
harness imports is there; kernels never imports dkbench)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import kernels
import kernels.fp8
from kernels import KERNELS, Choice, KernelRecord, configs, select
from kernels.attention import CONFIG_ARGUMENTS
from kernels.config_cache import ConfigCache, load_shipped
from kernels.configs import IMPLS, LaunchConfig, config_problems, default_config
from kernels.registry import AXES, TUNABLE

ROOT = Path(__file__).resolve().parents[2]
KERNELS_DIR = ROOT / "kernels"
HASHED = sorted({module for record in KERNELS.values() for module in record.sources})
MODULES = sorted(f"kernels.{p.stem}" for p in KERNELS_DIR.glob("*.py") if p.stem != "__init__")


# -- the records -----------------------------------------------------------------------------------


def test_records_are_keyed_by_name_in_a_fixed_order() -> None:
    assert list(KERNELS) == ["fwd", "bwd", "dq", "varlen", "decode", "fp8"]
    for name, record in KERNELS.items():
        assert isinstance(record, KernelRecord) and record.name == name
        assert record.description and "\n" not in record.description, name
    with pytest.raises(dataclasses.FrozenInstanceError):
        KERNELS["fwd"].tunable = False  # type: ignore[misc]


def test_kernels_hash_todays_modules_in_todays_order() -> None:
    """The shipped configs are keyed on these hashes: a change here (even of order) drops them.
    varlen and decode hash their own modules, not the forward's."""
    assert KERNELS["fwd"].sources == ("kernels.fwd", "kernels.fwd_tile", "kernels.common",
                                      "kernels.fwd_ws", "kernels.schedule", "kernels.fwd_halves",
                                      "kernels.halves_plan")
    # The dk/dv kernel's record also hashes the fused backward's pre-pass and launcher, the
    # column plan, and its Gluon form's module with the Gluon forward's copies and schedule.
    assert KERNELS["bwd"].sources == ("kernels.bwd", "kernels.common", "kernels.bwd_fused",
                                      "kernels.columns", "kernels.bwd_dkdv_ws", "kernels.fwd_ws",
                                      "kernels.schedule")
    # The dq kernel's Gluon form runs on the Gluon forward's work items and masks.
    assert KERNELS["dq"].sources == ("kernels.bwd", "kernels.common", "kernels.bwd_dq_ws",
                                     "kernels.fwd_ws", "kernels.schedule", "kernels.ws_mma",
                                     "kernels.bwd_dq_halves", "kernels.fwd_halves",
                                     "kernels.halves_plan")
    assert KERNELS["varlen"].sources == ("kernels.varlen", "kernels.fwd_tile", "kernels.common")
    assert KERNELS["decode"].sources == ("kernels.decode", "kernels.common")


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


def _called_jit_functions(fn: object) -> list[object]:
    """The jit functions ``fn``'s body names (the helpers it calls), resolved in its module."""
    inner = fn.fn
    found = []
    for name in inner.__code__.co_names:
        value = inner.__globals__.get(name)
        if isinstance(value, (JITFunction, InterpretedFunction)):
            found.append(value)
    return found


@pytest.mark.parametrize("name", list(KERNELS))
def test_sources_cover_every_jit_function_the_kernel_calls(name: str) -> None:
    """Every jit helper a kernel reaches, however deep (varlen's tile loop is fwd_tile's, which
    takes its masks from common), lives in a module the kernel's hash covers."""
    sources = KERNELS[name].sources
    todo = [fn for fn in _jit_functions(importlib.import_module(sources[0])).values()
            if fn.fn.__module__ == sources[0]]
    seen: set[int] = set()
    while todo:
        fn = todo.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        assert fn.fn.__module__ in sources, (
            f"{name}: {fn.fn.__qualname__} of {fn.fn.__module__} runs in the kernel, but "
            f"KERNELS[{name!r}].sources does not hash its module")
        todo.extend(_called_jit_functions(fn))
    assert len(seen) > 1, f"{name}: no jit helpers found: the walk is broken"


def test_implementations_entries_config_arguments_and_tunable() -> None:
    for name, record in KERNELS.items():
        assert "triton" in record.impls and set(record.impls) <= set(IMPLS), name
        assert record.impls[0] == "triton", name  # the fallback the dispatcher runs
        params = inspect.signature(getattr(kernels, record.entry)).parameters
        assert params[record.config_argument].default is None, name
        assert record.entry in kernels.__all__, name
        assert record.config_meaning, name
    assert KERNELS["fwd"].impls == ("triton", "gluon")
    assert CONFIG_ARGUMENTS == {"fwd": "config", "bwd": "bwd_config", "dq": "dq_config"}
    assert all(r.tunable for r in KERNELS.values())  # the fp8 forward too, on fp8 cases
    # What `dkbench tune` reaches through sparse_attention today.
    assert TUNABLE == ("fwd", "bwd", "dq")
    assert inspect.signature(kernels.sparse_attention_padded).parameters["config"].default is None


@pytest.mark.parametrize("name", list(KERNELS))
def test_search_space_is_data_over_the_config_axes(name: str) -> None:
    space = KERNELS[name].search_space
    assert tuple(space) == AXES, name
    assert space["impl"] == KERNELS[name].impls
    for axis in AXES:
        assert isinstance(space[axis], tuple) and space[axis], (name, axis)
    with pytest.raises(TypeError):
        space["block_m"] = (1,)  # type: ignore[index]
    # Every Triton point of the space can run at a sparse block size of 128 and head_dim 128
    # (the tuner caps block_n, and the dk/dv kernel's block_m, at smaller block sizes).
    for values in itertools.product(*(space[axis] for axis in AXES)):
        config = LaunchConfig(*values)
        if config.impl == "triton" and config.block_n <= 128:
            assert not config_problems(config, 128, 128, name), (name, config)
    assert KERNELS["decode"].search_space["block_m"] == (configs.DECODE_BLOCK_M,)
    # The stage bound leaves every searched depth in (it refuses only typos such as 1000).
    assert max(space["num_stages"]) <= configs.MAX_STAGES
    # (fp8 products take at least 32 keys a step.)
    block_n = 32 if name == "fp8" else 16
    assert config_problems(LaunchConfig(16, block_n, 4, configs.MAX_STAGES), 16, 64, name) == []
    assert config_problems(LaunchConfig(16, block_n, 4, configs.MAX_STAGES + 1), 16, 64,
                           name) == [
        f"num_stages={configs.MAX_STAGES + 1} must be 1 to {configs.MAX_STAGES}"]


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("gluon", [False, True])
def test_every_kernel_has_a_default_its_own_rules_accept(name: str, device: str, gluon: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if gluon:  # a Hopper GPU with Gluon: the dispatcher would run the Gluon fwd, dq and dk/dv
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(configs, "choose_impl", lambda kernel, impl, *a: Choice(impl, ""))
        monkeypatch.setattr(kernels.fp8, "fp8_gluon_unavailable",
                            lambda device: None if device.type == "cuda" else "not a GPU")
    else:
        monkeypatch.setattr(configs, "gluon_default_applies", lambda *args: False)
    for block_size, head_dim, dtype in ((16, 32, torch.float32), (64, 128, torch.bfloat16),
                                        (128, 256, torch.float16), (32, 80, torch.float32)):
        config = default_config(name, torch.device(device), block_size, head_dim, dtype)
        assert not config_problems(config, block_size, head_dim, name), (name, config)
        assert config.impl in KERNELS[name].impls
        if config.impl == "gluon":
            assert name in ("fwd", "dq", "bwd", "fp8") and gluon and device == "cuda"
        elif (name in ("fwd", "dq", "bwd", "fp8") and gluon and device == "cuda"
              and block_size == 64):
            raise AssertionError(f"the {name} default at bs 64, d128 is {config}, not Gluon")


def test_unknown_kernel_names_are_refused() -> None:
    config = LaunchConfig(64, 64)
    with pytest.raises(ValueError, match="unknown kernel 'fwd_bwd'; the kernels are fwd, bwd"):
        config_problems(config, 64, 64, "fwd_bwd")
    with pytest.raises(ValueError, match="unknown kernel"):
        default_config("prefill", torch.device("cpu"), 64, 64, torch.float32)


def test_decode_configs_pin_block_m() -> None:
    assert config_problems(LaunchConfig(16, 32, 2, 1), 64, 64, "decode") == []
    assert config_problems(LaunchConfig(32, 32, 2, 1), 64, 64, "decode") == [
        ("block_m=32 must be 16 for decoding (its query tile is the GQA group's heads, not a "
         "config's)")]
    assert config_problems(LaunchConfig(16, 16), 16, 64, "decode") == []
    assert config_problems(LaunchConfig(16, 32), 16, 64, "decode") == [
        "block_n=32 must not exceed the sparse block size 16"]
    assert "runs the fwd, bwd, dq, fp8 kernels only" in " ".join(
        config_problems(LaunchConfig(128, 128, 4, 3, "gluon"), 64, 128, "varlen"))


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


@pytest.mark.parametrize("module_name", MODULES)
def test_kernel_hash_changes_exactly_for_the_kernels_hashing_an_edited_module(
        module_name: str, monkeypatch: pytest.MonkeyPatch, fresh_hashes) -> None:
    """Editing a module changes the hash of exactly the kernels whose sources list it: each of
    a kernel's modules changes it, and any other module (another kernel's, the launch-config
    rules, the API) does not. A constant hash fails the first, a hash of everything the second."""
    before = _hashes()
    assert _hashes() == before  # stable while nothing changes
    _edit_source(monkeypatch, module_name)
    after = _hashes()
    changed = {name for name in KERNELS if after[name] != before[name]}
    assert changed == {name for name, r in KERNELS.items() if module_name in r.sources}
    if module_name in HASHED:
        assert changed, f"editing {module_name} changed no kernel's hash"


@pytest.mark.parametrize("name", list(KERNELS))
def test_each_source_module_changes_its_kernels_hash_through_the_hashed_bytes(
        name: str, monkeypatch: pytest.MonkeyPatch, fresh_hashes) -> None:
    """The same through the bytes source_hash reads (``kernels.keys._source_bytes``)."""
    from kernels import keys

    before = _hashes()
    real = keys._source_bytes
    for module_name in KERNELS[name].sources:
        target = importlib.import_module(module_name)
        with monkeypatch.context() as patch:
            patch.setattr(keys, "_source_bytes",
                          lambda obj, t=target: real(obj) + (b"#" if obj is t else b""))
            after = _hashes()
        assert after[name] != before[name], f"{module_name} does not change {name}'s hash"
        unrelated = {n for n, r in KERNELS.items() if module_name not in r.sources}
        assert {n: after[n] for n in unrelated} == {n: before[n] for n in unrelated}


def test_varlen_and_decode_have_their_own_hashes(fresh_hashes) -> None:
    hashes = _hashes()
    assert len({hashes[name] for name in ("fwd", "bwd", "varlen", "decode")}) == 4
    # One module holds both kernels; the dk/dv kernel's record also hashes the fused backward.
    assert hashes["bwd"] != hashes["dq"]


def test_forward_hash_follows_the_schedule_and_backward_hash_its_module(
        monkeypatch: pytest.MonkeyPatch, fresh_hashes) -> None:
    before = _hashes()
    with monkeypatch.context() as patch:
        _edit_source(patch, "kernels.schedule")
        after = _hashes()
    # The Gluon dq and dk/dv kernels are dealt by the forward's schedule.
    assert after["fwd"] != before["fwd"] and after["dq"] != before["dq"]
    assert after["bwd"] != before["bwd"]
    _edit_source(monkeypatch, "kernels.bwd")
    after = _hashes()
    assert after["fwd"] == before["fwd"]
    assert after["bwd"] != before["bwd"] and after["dq"] != before["dq"]


# -- the shipped configs ---------------------------------------------------------------------------


def stale_entries(files: list[Path]) -> list[str]:
    """The shipped entries whose kernel_hash is not today's, each naming the kernel to retune."""
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
                             f"{now}: retune {kernel}")
    return stale


def test_shipped_configs_carry_the_current_kernel_hashes() -> None:
    """Every shipped entry (kernels/tuned/*.json, none while the kernels await a retune) was
    tuned for today's kernel source."""
    stale = stale_entries(sorted((KERNELS_DIR / "tuned").glob("*.json")))
    assert not stale, ("the shipped configs no longer match the kernel sources, so they are "
                       "ignored at launch: re-tune the kernel (benchmarks/reproduce.sh OUT tune) "
                       "and reship kernels/tuned/\n" + "\n".join(stale))


def test_the_shipped_check_names_each_stale_kernel(tmp_path: Path) -> None:
    """The check above fails on an entry tuned for another source, and passes today's."""
    file = tmp_path / "h200.json"
    cache = ConfigCache(file)
    config = LaunchConfig(64, 64).as_dict()
    key = select.cache_key("varlen", torch.device("cpu"), torch.bfloat16, 128, 64, 8192, 0.3)
    cache.put(key, config, ms=1.0, default_ms=1.0)
    assert stale_entries([file]) == []
    old = dataclasses.replace(key, kernel="decode", kernel_hash="0badc0de")
    cache.put(old, config, ms=1.0, default_ms=1.0)
    (report,) = stale_entries([file])
    assert report.startswith("h200.json: decode entry ") and "kernel_hash 0badc0de" in report
    assert report.endswith(f"kernels.decode, kernels.common now hash to "
                           f"{select.kernel_hash('decode')}: retune decode")


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


def test_every_name_the_harness_takes_from_a_private_module_is_public() -> None:
    """The harness can import all it uses from ``kernels`` itself, the same objects."""
    for module_name, name in sorted(_kernels_imports(), key=str):
        if name is None or module_name == "kernels":
            continue
        assert name in kernels.__all__, f"{module_name}.{name} is not exported by kernels"
        assert getattr(kernels, name) is getattr(importlib.import_module(module_name), name)


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
