"""Loading a sweep spec: the YAML read safely, validated field by field, then checked across
fields (names, ranges, impossible combinations) before anything runs.

Every error names the file, the key path and what is allowed; the wording of pydantic's errors
and the YAML loader live in `dkbench.spec.messages`.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kernels import MAX_NUM_BLOCKS, LaunchConfig, config_problems

from ..errors import SpecError
from ..measure.providers import PROVIDERS
from .messages import (
    DuplicateKey,
    SpecLoader,
    error_text,
    error_where,
    only_model,
    show,
    validation_message,
    yaml_problem,
)
from .patterns import PATTERN_TYPES, DensePattern, FilePattern, LocalStridePattern, RandomPattern
from .sweep import (
    AXIS_RANGES,
    CASE_KEYS,
    DTYPES,
    GRAPH_SUFFIX,
    INFERENCE_MODES,
    MAX_CASES,
    MAX_LAYOUT_BLOCKS,
    MODES,
    Case,
    Check,
    LaunchConfigSpec,
    Sweep,
    Timing,
    as_list,
    expand,
    row_provider,
)


def _model_at(parent: tuple) -> Any:
    """The model whose fields sit at ``parent`` in a spec (a location without its last key), or
    None: what `spec_messages` lists as the allowed keys and bounds there."""
    if not parent:
        return Sweep
    if len(parent) == 1:
        return {"timing": Timing, "check": Check, "config": LaunchConfigSpec}.get(str(parent[0]))
    if parent[0] == "patterns" and len(parent) == 3:
        return {"local_stride": LocalStridePattern, "dense": DensePattern,
                "random": RandomPattern, "file": FilePattern}.get(str(parent[2]))
    return None


def load_spec(path: str | Path) -> Sweep:
    """Read and validate a YAML spec (``yaml.safe_load`` only); raise SpecError on any problem."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"{path}: is a directory; give a spec file (YAML)")
    if not path.exists():
        raise SpecError(f"{path}: no such spec file")
    if not path.is_file():  # a device, a FIFO or a socket: reading it could block or never end
        raise SpecError(f"{path}: not a regular file; give a spec file (YAML)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not a text file (byte {exc.object[exc.start]:#04x} at offset "
                        f"{exc.start} is not UTF-8); a sweep spec is YAML text") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    try:
        raw = yaml.load(text, Loader=SpecLoader)  # noqa: S506 - a SafeLoader
    except DuplicateKey as exc:
        raise SpecError(f"{path}: line {exc.line}: duplicate key {exc.key!r} (first given on "
                        f"line {exc.first}); each key may appear once in a mapping") from None
    except yaml.MarkedYAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    except yaml.YAMLError as exc:
        problem = str(exc).replace(' in "<unicode string>"', "")
        raise SpecError(f"{path}: not valid YAML: {problem}") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a sweep spec is a YAML mapping of keys, got {type(raw).__name__}")
    sweep = sweep_from_dict(raw, path)
    sweep = _resolve_files(sweep, path.parent)
    check_sweep(sweep, path)
    return sweep


def sweep_from_dict(raw: dict, path: str | Path) -> Sweep:
    """A spec already parsed (a YAML file's, or one recorded in a run's meta.json) validated
    field by field; SpecError lists each bad key under ``path``, in the project's words."""
    try:
        return Sweep.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(validation_message(Path(path), exc, _model_at)) from None


def _resolve_files(sweep: Sweep, base: Path) -> Sweep:
    """File patterns' relative paths made absolute against the spec's folder, as written. Not
    `resolve()`: following a symlink would rename the file in its label, so two entries (`a.npy`
    and a link to it) checked distinct would share one label, and so one case id. Nor `..`
    folded away by hand, which after a symlinked folder is not where the OS goes."""
    patterns = [p.model_copy(update={"path": str((base / p.path).absolute())})
                if isinstance(p, FilePattern) and not Path(p.path).is_absolute() else p
                for p in sweep.patterns]
    return sweep.model_copy(update={"patterns": patterns})


def check_sweep(sweep: Sweep, path: Path) -> None:
    """Cross-field rules pydantic cannot express: names, ranges and impossible combinations."""
    def fail(key: str, msg: str) -> None:
        raise SpecError(f"{path}: {key}: {msg}")

    for i, d in enumerate(as_list(sweep.dtype)):
        if d not in DTYPES:
            fail(f"dtype[{i}]" if isinstance(sweep.dtype, list) else "dtype",
                 f"unknown dtype {d!r}; allowed: {', '.join(DTYPES)}")
    for i, name in enumerate(sweep.providers):
        if name not in PROVIDERS:
            fail(f"providers[{i}]", f"unknown provider {name!r}; allowed: {', '.join(PROVIDERS)}")
    _check_provider_options(sweep, fail)
    if sweep.baseline is not None and sweep.baseline not in sweep.providers:
        fail("baseline", f"{sweep.baseline!r} is not in providers ({', '.join(sweep.providers)})")
    for key in ("seqlen", "heads", "head_dim", "batch", "batch_tokens", "q_len", "kv_heads"):
        for v in [x for x in as_list(getattr(sweep, key)) if x is not None]:  # 0 is checked too
            if v < 1:
                fail(key, f"must be a positive integer, got {v}")
            lo, hi = AXIS_RANGES[key]
            if v > hi and key != "head_dim":
                fail(key, f"{v} is too large; allowed: {lo} to {hi} (2**{hi.bit_length() - 1})")
    for d in as_list(sweep.head_dim):
        if not 16 <= d <= 256:
            fail("head_dim", f"{d} is not supported; allowed: 16 to 256")
    modes = as_list(sweep.mode)
    if sweep.length_spread and not set(modes) & set(INFERENCE_MODES):
        fail("length_spread", f"{sweep.length_spread} draws the lengths of prefill_varlen and "
             f"decode sequences, and the spec's modes are {', '.join(modes)}; allowed: "
             "length_spread 0 (or left out) with these modes, or a mode prefill_varlen or decode")
    if sweep.length_spread and sweep.lengths:
        fail("length_spread", f"{sweep.length_spread} draws the sequences' lengths, and lengths "
             "gives them, so it would do nothing; allowed: one of length_spread and lengths")
    if any(p is not None for p in as_list(sweep.page_size)) and set(modes) != {"decode"}:
        fail("page_size", f"a paged KV cache applies to mode decode only, and the spec's modes are "
             f"{', '.join(modes)}; allowed: page_size null (or left out) with other modes, or "
             "mode: decode")
    if sweep.lengths and len(sweep.lengths) > AXIS_RANGES["batch"][1]:
        fail("lengths", f"{len(sweep.lengths)} sequences; allowed: at most "
             f"{AXIS_RANGES['batch'][1]} (the batch)")
    for i, p in enumerate(sweep.patterns):
        bs = p.block_size
        if bs < 16 or bs & (bs - 1) or bs > 1024:
            fail(f"patterns[{i}].block_size", f"must be a power of two >= 16, got {bs}; allowed: "
                 "16, 32, 64, 128, 256, 512, 1024")
    _check_launch_config(sweep, fail)
    for i, rule in enumerate(sweep.exclude):
        unknown = sorted(set(rule) - set(CASE_KEYS))
        if unknown or not rule:
            fail(f"exclude[{i}]", f"unknown key(s) {unknown or '(empty rule)'}; allowed: "
                 f"{', '.join(CASE_KEYS)}")
        # A misspelt provider (or graph suffix) would exclude nothing, silently; so would none.
        if rule.get("provider", None) == []:
            fail(f"exclude[{i}].provider", f"an empty list; give at least one provider "
                 f"({', '.join(PROVIDERS)})")
        for name in as_list(rule.get("provider", [])):
            if not isinstance(name, str) or row_provider(name)[0] not in PROVIDERS:
                fail(f"exclude[{i}].provider", f"unknown provider {name!r}; allowed: a provider "
                     f"({', '.join(PROVIDERS)}), or one with {GRAPH_SUFFIX} for its CUDA-graph "
                     "rows (timing.cuda_graph: [false, true])")
        _check_exclusion_values(sweep, i, rule, fail)
    _check_case_count(sweep, fail)
    cases = expand(sweep)
    if not cases:
        fail("exclude", "the exclusion rules remove every case")
    layouts: dict[tuple, Any] = {}
    for case in cases:
        _check_case(case, fail, layouts)


_INT_KEYS = ("batch", "seqlen", "q_len", "heads", "kv_heads", "head_dim", "block_size")


def _check_exclusion_values(sweep: Sweep, i: int, rule: dict, fail) -> None:
    """Each value of an exclusion rule must be one a case can have: a misspelt mode, a quoted
    `"true"` or a pattern label the spec does not hold would exclude nothing, silently."""
    labels = [p.label() for p in sweep.patterns]
    allowed = {
        "mode": (lambda v: v in MODES, f"allowed: {', '.join(MODES)}"),
        "dtype": (lambda v: v in DTYPES, f"allowed: {', '.join(DTYPES)}"),
        "causal": (lambda v: isinstance(v, bool), "allowed: true, false"),
        "pattern_type": (lambda v: v in PATTERN_TYPES, f"allowed: {', '.join(PATTERN_TYPES)}"),
        "pattern": (lambda v: v in labels, f"allowed: the spec's patterns' labels "
                    f"({', '.join(labels)})"),
        "page_size": (lambda v: v is None or type(v) is int, "allowed: null (a contiguous "
                      "cache) or a page size in tokens"),
        **{key: (lambda v: type(v) is int, "allowed: integers") for key in _INT_KEYS},
    }
    for key, wanted in rule.items():
        if key not in allowed:
            continue  # provider, checked above
        ok, words = allowed[key]
        values = as_list(wanted)
        if not values:
            fail(f"exclude[{i}].{key}", f"an empty list; give at least one value ({words})")
        for j, v in enumerate(values):
            if isinstance(v, (dict, list)) or not ok(v):
                where = f"exclude[{i}].{key}" + (f"[{j}]" if isinstance(wanted, list) else "")
                fail(where, f"{show(v)} is not a {key} a case can have; {words}")


def _check_case_count(sweep: Sweep, fail) -> None:
    """Refuse, before expanding, axes that multiply to more than MAX_CASES cases."""
    axes = {key: len(as_list(getattr(sweep, key))) for key in (
        "mode", "dtype", "seqlen", "q_len", "heads", "kv_heads", "head_dim", "causal", "patterns",
        "batch", "batch_tokens", "page_size") if getattr(sweep, key) is not None}
    total = math.prod(axes.values())
    if total > MAX_CASES:
        longest = max(axes, key=axes.__getitem__)
        product = " x ".join(f"{n} {key}" for key, n in axes.items() if n > 1)
        fail(longest, f"the axes multiply to {total} cases ({product}); allowed: at most "
             f"{MAX_CASES} in one spec (shorten {longest} or split the sweep)")


def _check_provider_options(sweep: Sweep, fail) -> None:
    for name, given in sweep.provider_options.items():
        key = f"provider_options.{name}"
        if name not in sweep.providers:
            fail(key, f"{name!r} is not in providers ({', '.join(sweep.providers)})")
        model = PROVIDERS[name].Options
        if model is None:
            fail(key, f"{name} takes no options")
        if not isinstance(given, dict):
            fail(key, f"expected a mapping of option: value, got {type(given).__name__}")
        try:
            model.model_validate(given)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = error_where(err)
            fail(f"{key}.{where}" if where else key, error_text(err, only_model(model)))


def _check_launch_config(sweep: Sweep, fail) -> None:
    """A pinned `config` must suit every block size and head_dim of the sweep: the kernels' own
    validity rules, applied before anything runs."""
    if sweep.config is None:
        return
    if set(as_list(sweep.mode)) == {"decode"}:
        # The bundled provider pins it on the forward (and the varlen kernel), never on decoding.
        fail("config", "pins the bundled kernel's forward launch config (prefill_varlen: its "
             "varlen kernel's); the decoding kernel takes its config from the cache or its "
             "default, so with mode decode alone it would do nothing; allowed: config null (or "
             "left out) with mode decode, or a mode fwd, bwd, fwd_bwd or prefill_varlen")
    config = LaunchConfig(**sweep.config.model_dump())
    for block_size in sorted({p.block_size for p in sweep.patterns}):
        for head_dim in sorted(set(as_list(sweep.head_dim))):
            problems = config_problems(config, block_size, head_dim)
            if problems:
                fail("config", f"{config.short()} cannot run block_size {block_size}, head_dim "
                     f"{head_dim}: {'; '.join(problems)}")


def _check_case(case: Case, fail, layouts: dict[tuple, Any]) -> None:
    """One case's cross-field rules; ``layouts`` holds the pattern files read so far, so a long
    axis of lengths reads each file once (generated patterns are built at one block, cached)."""
    if case.mode == "decode" and not case.causal:
        fail("causal", "mode decode needs causal: true (a new token sees only the past)")
    if case.heads % case.kv_heads:
        divisors = ", ".join(str(n) for n in range(1, case.heads + 1) if case.heads % n == 0)
        fail("kv_heads", f"heads={case.heads} is not divisible by kv_heads={case.kv_heads}; "
             f"allowed: a kv_heads that divides heads ({divisors})")
    if case.batch < 1:
        fail("batch_tokens", f"fewer tokens than seqlen={case.seqlen} gives a batch of 0; "
             f"allowed: batch_tokens of at least seqlen ({case.seqlen} here) for every seqlen")
    if case.batch > AXIS_RANGES["batch"][1]:
        fail("batch_tokens", f"seqlen={case.seqlen} gives a batch of {case.batch}; allowed: at "
             f"most {AXIS_RANGES['batch'][1]}")
    if case.lengths and max(case.lengths) > case.seqlen:
        fail("lengths", f"the longest sequence ({max(case.lengths)}) exceeds seqlen={case.seqlen}, "
             f"the padded length; allowed: lengths from 1 to seqlen ({case.seqlen} here), for "
             "every seqlen")
    if case.q_len > case.seqlen:
        fail("q_len", f"q_len={case.q_len} exceeds seqlen={case.seqlen}; queries are the last "
             f"positions of the key sequence (each q_len is paired with every seqlen); allowed: "
             f"q_len from 1 to seqlen ({case.seqlen} here)")
    label, file = case.pattern.label(), isinstance(case.pattern, FilePattern)
    try:
        if file:  # read once per check, not per length
            key = (case.pattern, case.causal)
            if key not in layouts:
                layouts[key] = case.pattern.layout(case.heads, case.kv_heads, case.seqlen,
                                                   case.causal)
            layout = layouts[key]
            layout.check_seqlen(case.seqlen, case.q_len)
        else:
            layout = _generated_layout(case.pattern, case.heads, case.kv_heads, case.causal)
    except (ValueError, TypeError, OverflowError) as exc:
        fail("patterns", f"{label}: {exc}")
    if layout.heads not in (1, case.kv_heads, case.heads):
        fail("patterns", f"{label} has {layout.heads} heads; expected 1, "
             f"kv_heads={case.kv_heads} or heads={case.heads}")
    blocks = -(-case.seqlen // case.block_size)
    if not file and layout.heads * blocks * blocks > MAX_LAYOUT_BLOCKS:
        fail("patterns", f"{label} at seqlen={case.seqlen} is {layout.heads} x {blocks} x "
             f"{blocks} blocks; allowed: at most 2**{MAX_LAYOUT_BLOCKS.bit_length() - 1} (a "
             "larger block_size, fewer pattern heads or a shorter seqlen)")
    if not file and blocks > MAX_NUM_BLOCKS:
        # The generator refuses it when the run builds it (its index forms count in int32).
        fail("patterns", f"{label} at seqlen={case.seqlen} is {blocks} blocks a side; allowed: "
             f"at most {MAX_NUM_BLOCKS} (a head's kept blocks are counted in int32), seqlen up "
             f"to {MAX_NUM_BLOCKS * case.block_size} at block_size {case.block_size} (a larger "
             "block_size or a shorter seqlen)")


@functools.lru_cache(maxsize=256)
def _generated_layout(pattern: Any, heads: int, kv_heads: int, causal: bool):
    """A generated pattern as validation needs it: one block long.

    A generator checks its own arguments and picks its head count whatever the length, and its
    layout at a long seqlen can take gigabytes (the run builds that one)."""
    return pattern.layout(heads, kv_heads, pattern.block_size, causal)
