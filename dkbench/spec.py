"""Sweep specs: YAML in, a validated `Sweep` and its frozen `Case`s out.

Every error names the file, the key path and what is allowed, before anything runs; the wording
of pydantic's errors and the YAML loader live in `dkbench.spec_messages`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kernels.configs import LaunchConfig, config_problems

from .errors import SpecError
from .patterns import DensePattern, FilePattern, LocalStridePattern, PatternSpec, RandomPattern
from .spec_messages import (
    AxisError,
    DuplicateKey,
    SpecLoader,
    error_text,
    error_where,
    only_model,
    show,
    validation_message,
    yaml_problem,
)

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "half": "float16", "fp32": "float32", "float32": "float32"}
MODES = ("fwd", "bwd", "fwd_bwd", "prefill_varlen", "decode")
TRAINING_MODES = ("fwd", "bwd", "fwd_bwd")
INFERENCE_MODES = ("prefill_varlen", "decode")
Mode = Literal["fwd", "bwd", "fwd_bwd", "prefill_varlen", "decode"]
DEVICES = ("auto", "cuda", "cpu")

IntList = Union[int, list[int]]
DEFAULT_RTOL = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 5e-3}

# What each integer axis allows, checked before anything is built: far beyond any GPU's reach,
# close enough that a typo (an extra 0, a byte count for a length) is refused at once.
MAX_SEQLEN = 2**24
AXIS_RANGES = {"batch": (1, 2**20), "batch_tokens": (1, 2**32), "seqlen": (1, MAX_SEQLEN),
               "q_len": (1, MAX_SEQLEN), "heads": (1, 1024), "kv_heads": (1, 1024),
               "head_dim": (16, 256)}
# A spec's axes may multiply to this many cases; past it, expanding and checking them is what
# would take minutes (and no GPU runs them all).
MAX_CASES = 100_000
# Block entries of one generated layout (pattern heads x blocks x blocks, a bool each).
MAX_LAYOUT_BLOCKS = 2**32
# Strict: a YAML `true` is not the integer 1, and `64.5` or `"64"` are not integers.
_STRICT = ConfigDict(extra="forbid", strict=True)


class Timing(BaseModel):
    model_config = _STRICT
    warmup_ms: float = Field(25.0, gt=0, allow_inf_nan=False)
    rep_ms: float = Field(100.0, gt=0, allow_inf_nan=False)
    cuda_graph: bool = False
    # Time a case's providers together, in rounds of one turn each (dkbench.timing), so a drift of
    # the GPU's speed lands on all of them alike; `speedup` is then the median of per-round ratios.
    # Graph replay
    # times one provider at a time, so cuda_graph turns this off unless it is given too (an error).
    interleave: bool = True

    @model_validator(mode="after")
    def _graph_or_interleave(self) -> Timing:
        if self.cuda_graph and self.interleave:
            if "interleave" in self.model_fields_set:
                raise ValueError("timing.interleave and timing.cuda_graph are both true; pick one "
                                 "(graphs are replayed one provider at a time, so they cannot be "
                                 "interleaved)")
            self.interleave = False
        return self


class Check(BaseModel):
    model_config = _STRICT
    enabled: bool = True
    # Cases larger than this many tokens (batch * seqlen) are checked on a cut-down copy: batch 1,
    # seqlen clipped to it, same pattern and heads. The reference materialises the token mask.
    max_tokens: int = Field(2048, ge=16)
    # Relative error allowed per dtype; given keys (aliases like bf16 allowed) override these.
    rtol: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        default_factory=lambda: dict(DEFAULT_RTOL))

    @field_validator("rtol")
    @classmethod
    def _canonical_rtol(cls, given: dict[str, float]) -> dict[str, float]:
        unknown = sorted(k for k in given if k not in DTYPES)
        if unknown:
            raise ValueError(f"unknown dtype(s) {unknown}; allowed: {', '.join(DTYPES)}")
        return {**DEFAULT_RTOL, **{DTYPES[k]: v for k, v in given.items()}}


class LaunchConfigSpec(BaseModel):
    model_config = _STRICT
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    impl: Literal["triton", "gluon"] = "triton"


def _axis_values() -> dict[str, tuple[str, Any, str]]:
    """Axis key -> (what one value is, its test, what is allowed)."""
    table = {
        "mode": ("a mode", lambda v: isinstance(v, str) and v in MODES,
                 f"allowed: {', '.join(MODES)}"),
        "dtype": ("a dtype", lambda v: isinstance(v, str), f"allowed: {', '.join(DTYPES)}"),
        "causal": ("a boolean", lambda v: isinstance(v, bool), "allowed: true, false"),
    }
    for key, (lo, hi) in AXIS_RANGES.items():
        table[key] = ("an integer", lambda v: type(v) is int, f"allowed: integers {lo} to {hi}")
    return table


# A union of a value and a list reports one error per branch in pydantic's words; these axes
# are checked first, in ours.
AXIS_VALUES = _axis_values()
_NULLABLE_AXES = ("batch", "batch_tokens", "q_len", "kv_heads")


class Sweep(BaseModel):
    """A sweep spec as written in YAML (lists are the axes of a cartesian product)."""

    model_config = _STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Union[str, list[str]] = "bf16"
    mode: Union[Mode, list[Mode]] = "fwd"
    batch: IntList | None = None
    batch_tokens: IntList | None = None
    seqlen: IntList
    q_len: IntList | None = None
    heads: IntList
    kv_heads: IntList | None = None
    head_dim: IntList
    causal: Union[bool, list[bool]] = True
    sm_scale: float | None = Field(None, gt=0, allow_inf_nan=False)
    patterns: list[PatternSpec] = Field(min_length=1)
    providers: list[str] = Field(min_length=1)
    baseline: str | None = None
    seed: int = 0
    # prefill_varlen and decode: each sequence's length is drawn from
    # [seqlen * (1 - length_spread), seqlen] (seeded); 0 makes them all seqlen.
    length_spread: float = Field(0.0, ge=0.0, lt=1.0, allow_inf_nan=False)
    # prefill_varlen and decode: the exact per-sequence lengths (for decode, the cache lengths);
    # the batch is their count and every one must be <= seqlen (the padded length).
    lengths: list[int] | None = Field(None, min_length=1)
    timing: Timing = Field(default_factory=Timing)
    check: Check = Field(default_factory=Check)
    config: LaunchConfigSpec | None = None
    # Per-provider settings, e.g. {fa4_sparse: {fwd_block: [128, 64]}}; each provider's own model
    # (`Provider.Options`) checks its entry when the spec is loaded.
    provider_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    exclude: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator(*AXIS_VALUES, mode="before")
    @classmethod
    def _axis(cls, value: Any, info: ValidationInfo) -> Any:
        """Each value of an axis: its type, no empty list, no value twice."""
        key = info.field_name
        if value is None and key in _NULLABLE_AXES:
            return value
        what, ok, allowed = AXIS_VALUES[key]
        given = isinstance(value, list)
        if given and not value:
            raise AxisError(f"an empty list; give at least one value ({allowed})")
        seen: dict[Any, int] = {}
        for i, v in enumerate(_as_list(value)):
            if not ok(v):
                raise AxisError(f"{show(v)} is not {what}; {allowed}", i if given else None)
            same = DTYPES.get(v, v) if key == "dtype" else v
            if same in seen:
                raise AxisError(f"{show(v)} is given twice (also at [{seen[same]}]); each "
                                "value of an axis may appear once", i)
            seen[same] = i
        return value

    @field_validator("patterns", "providers")
    @classmethod
    def _distinct(cls, values: list, info: ValidationInfo) -> list:
        """No entry twice: patterns by label (what case ids hash), providers by name."""
        seen: dict[str, int] = {}
        for i, v in enumerate(values):
            label = v.label() if info.field_name == "patterns" else repr(v)
            if label in seen:
                same = values[seen[label]] == v
                raise AxisError(f"{label} is given twice (also at [{seen[label]}])" + (
                    "" if same else "; they differ only in keys the label leaves out, so their "
                    "case ids would collide"), i)
            seen[label] = i
        return values

    @model_validator(mode="after")
    def _one_batch_key(self) -> "Sweep":
        if self.lengths is not None:
            if any(m not in INFERENCE_MODES for m in _as_list(self.mode)):
                raise ValueError("lengths applies to the prefill_varlen and decode modes only")
            if self.batch_tokens is not None or (self.batch is not None and
                                                  _as_list(self.batch) != [len(self.lengths)]):
                raise ValueError(f"with lengths the batch is their count ({len(self.lengths)}); "
                                 "leave out batch and batch_tokens")
            if min(self.lengths) < 1:
                raise ValueError("lengths must be positive (zero-length sequences are not allowed)")
            return self
        if (self.batch is None) == (self.batch_tokens is None):
            raise ValueError("give exactly one of 'batch' and 'batch_tokens'")
        if self.q_len is not None and any(m in INFERENCE_MODES for m in _as_list(self.mode)):
            raise ValueError("q_len applies to fwd/bwd/fwd_bwd; prefill_varlen and decode draw "
                             "their own lengths (see length_spread)")
        return self


@dataclass(frozen=True)
class Case:
    """One point of the sweep: everything a provider needs to build and time a problem."""

    mode: str
    dtype: str
    batch: int
    seqlen: int
    q_len: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    pattern: Any  # one of the pattern models (frozen, hashable)
    sm_scale: float | None
    seed: int
    length_spread: float = 0.0
    lengths: tuple[int, ...] | None = None

    @property
    def block_size(self) -> int:
        return self.pattern.block_size

    @property
    def case_id(self) -> str:
        fields = (self.mode, self.dtype, self.batch, self.seqlen, self.q_len, self.heads,
                  self.kv_heads, self.head_dim, self.causal, self.pattern.label(), self.sm_scale,
                  self.seed)
        if self.length_spread:
            fields += (self.length_spread,)
        if self.lengths:
            fields += (self.lengths,)
        text = repr(fields)
        return hashlib.sha1(text.encode()).hexdigest()[:10]

    def field(self, key: str) -> Any:
        """A case attribute by spec key (`pattern` is its label, `pattern_type` its type)."""
        if key == "pattern":
            return self.pattern.label()
        if key == "pattern_type":
            return self.pattern.type
        if key == "block_size":
            return self.block_size
        return getattr(self, key)

    def label(self) -> str:
        q = f"q{self.q_len}/" if self.q_len != self.seqlen else ""
        return (f"{self.mode} {self.dtype} b{self.batch} {q}s{self.seqlen} h{self.heads}/"
                f"{self.kv_heads} d{self.head_dim} {'causal' if self.causal else 'bidir'} "
                f"{self.pattern.label()}")


CASE_KEYS = ("mode", "dtype", "batch", "seqlen", "q_len", "heads", "kv_heads", "head_dim",
             "causal", "pattern", "pattern_type", "block_size", "provider")


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


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
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
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
    try:
        sweep = Sweep.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(validation_message(path, exc, _model_at)) from None
    sweep = _resolve_files(sweep, path.parent)
    check_sweep(sweep, path)
    return sweep


def _resolve_files(sweep: Sweep, base: Path) -> Sweep:
    patterns = [p.model_copy(update={"path": str((base / p.path).resolve())})
                if isinstance(p, FilePattern) and not Path(p.path).is_absolute() else p
                for p in sweep.patterns]
    return sweep.model_copy(update={"patterns": patterns})


def check_sweep(sweep: Sweep, path: Path) -> None:
    """Cross-field rules pydantic cannot express: names, ranges and impossible combinations."""
    from .providers import PROVIDERS

    def fail(key: str, msg: str) -> None:
        raise SpecError(f"{path}: {key}: {msg}")

    for i, d in enumerate(_as_list(sweep.dtype)):
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
        for v in [x for x in _as_list(getattr(sweep, key)) if x is not None]:  # 0 is checked too
            if v < 1:
                fail(key, f"must be a positive integer, got {v}")
            lo, hi = AXIS_RANGES[key]
            if v > hi and key != "head_dim":
                fail(key, f"{v} is too large; allowed: {lo} to {hi} (2**{hi.bit_length() - 1})")
    for d in _as_list(sweep.head_dim):
        if not 16 <= d <= 256:
            fail("head_dim", f"{d} is not supported; allowed: 16 to 256")
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
    _check_case_count(sweep, fail)
    cases = expand(sweep)
    if not cases:
        fail("exclude", "the exclusion rules remove every case")
    layouts: dict[tuple, Any] = {}
    for case in cases:
        _check_case(case, fail, layouts)


def _check_case_count(sweep: Sweep, fail) -> None:
    """Refuse, before expanding, axes that multiply to more than MAX_CASES cases."""
    axes = {key: len(_as_list(getattr(sweep, key))) for key in (
        "mode", "dtype", "seqlen", "q_len", "heads", "kv_heads", "head_dim", "causal", "patterns",
        "batch", "batch_tokens") if getattr(sweep, key) is not None}
    total = math.prod(axes.values())
    if total > MAX_CASES:
        longest = max(axes, key=axes.__getitem__)
        product = " x ".join(f"{n} {key}" for key, n in axes.items() if n > 1)
        fail(longest, f"the axes multiply to {total} cases ({product}); allowed: at most "
             f"{MAX_CASES} in one spec (shorten {longest} or split the sweep)")


def _check_provider_options(sweep: Sweep, fail) -> None:
    from .providers import PROVIDERS

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
    config = LaunchConfig(**sweep.config.model_dump())
    for block_size in sorted({p.block_size for p in sweep.patterns}):
        for head_dim in sorted(set(_as_list(sweep.head_dim))):
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
        fail("kv_heads", f"heads={case.heads} is not divisible by kv_heads={case.kv_heads}")
    if case.batch < 1:
        fail("batch_tokens", f"fewer tokens than seqlen={case.seqlen} gives a batch of 0")
    if case.batch > AXIS_RANGES["batch"][1]:
        fail("batch_tokens", f"seqlen={case.seqlen} gives a batch of {case.batch}; allowed: at "
             f"most {AXIS_RANGES['batch'][1]}")
    if case.lengths and max(case.lengths) > case.seqlen:
        fail("lengths", f"the longest sequence ({max(case.lengths)}) exceeds seqlen={case.seqlen}, "
             "the padded length")
    if case.q_len > case.seqlen:
        fail("q_len", f"q_len={case.q_len} exceeds seqlen={case.seqlen}; queries are the last "
             "positions of the key sequence")
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


@functools.lru_cache(maxsize=256)
def _generated_layout(pattern: Any, heads: int, kv_heads: int, causal: bool):
    """A generated pattern as validation needs it: one block long.

    A generator checks its own arguments and picks its head count whatever the length, and its
    layout at a long seqlen can take gigabytes (the run builds that one)."""
    return pattern.layout(heads, kv_heads, pattern.block_size, causal)


def expand(sweep: Sweep) -> list[Case]:
    """The cartesian product of every list axis, minus excluded cases, in a stable order."""
    kv_heads = _as_list(sweep.kv_heads) if sweep.kv_heads is not None else [None]
    batches = (_as_list(sweep.batch) if sweep.batch is not None
               else [len(sweep.lengths)] if sweep.lengths else [None])
    tokens = _as_list(sweep.batch_tokens) if sweep.batch_tokens is not None else [None]
    q_lens = _as_list(sweep.q_len) if sweep.q_len is not None else [None]
    cases = []
    for (mode, dtype, seqlen, heads, kvh, dim, causal, pattern, batch, tok, q_len) in itertools.product(
            _as_list(sweep.mode), _as_list(sweep.dtype), _as_list(sweep.seqlen),
            _as_list(sweep.heads), kv_heads, _as_list(sweep.head_dim), _as_list(sweep.causal),
            sweep.patterns, batches, tokens, q_lens):
        if mode == "decode":
            q_len = 1  # one new token per sequence
        case = Case(mode=mode, dtype=DTYPES.get(dtype, dtype),
                    batch=batch if batch is not None else tok // seqlen, seqlen=seqlen,
                    q_len=q_len if q_len is not None else seqlen, heads=heads,
                    kv_heads=kvh if kvh is not None else heads, head_dim=dim, causal=causal,
                    pattern=pattern, sm_scale=sweep.sm_scale, seed=sweep.seed,
                    length_spread=sweep.length_spread if mode in INFERENCE_MODES else 0.0,
                    lengths=tuple(sweep.lengths) if sweep.lengths else None)
        if not any(_matches(case, rule) for rule in sweep.exclude):
            cases.append(case)
    return cases


def _matches(case: Case, rule: dict[str, Any], provider: str | None = None) -> bool:
    for key, wanted in rule.items():
        if key == "provider":
            if provider is None:
                return False  # a rule naming a provider excludes rows, not whole cases
            value = provider
        else:
            value = case.field(key)
        if key == "dtype":
            wanted = [DTYPES.get(w, w) for w in _as_list(wanted)]
        if value not in _as_list(wanted) and str(value) not in [str(w) for w in _as_list(wanted)]:
            return False
    return True


def excluded_for_provider(sweep: Sweep, case: Case, provider: str) -> bool:
    """True when an exclusion rule that names a provider removes this case x provider."""
    return any("provider" in rule and _matches(case, rule, provider) for rule in sweep.exclude)


def filter_cases(cases: list[Case], only: list[str]) -> list[Case]:
    """Keep cases matching every ``KEY=VALUE`` (comma-separated values allowed) of ``--only``."""
    for item in only:
        key, sep, value = item.partition("=")
        if not sep or key not in CASE_KEYS or key == "provider":
            raise SpecError(f"--only {item!r}: expected KEY=VALUE with KEY one of "
                            f"{', '.join(k for k in CASE_KEYS if k != 'provider')}")
        # Pattern labels hold commas inside parentheses: split only on the others.
        values = [v.strip().lower() for v in re.split(r",(?![^()]*\))", value)]
        if key == "dtype":
            values = [DTYPES.get(v, v) for v in values]
        cases = [c for c in cases if str(c.field(key)).lower() in values]
    return cases
