"""The sweep spec's model: a validated `Sweep`, its frozen `Case`s, and the expansion of list
axes into cases (`expand`), with the exclusion and `--only` filters.

`dkbench.spec.load` reads a YAML file into a `Sweep` and checks it across fields.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NoReturn, Optional, Sequence, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kernels import PAGE_SIZES

from ..errors import SpecError
from ..names import BUNDLED_PROVIDER
from .messages import (
    AxisError,
    show,
)
from .patterns import PatternSpec

# fp8 cases make bf16 inputs; the providers that compute in fp8 quantise them (e4m3, descaled),
# the others refuse the case.
FP8 = "float8_e4m3fn"
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "half": "float16", "fp32": "float32", "float32": "float32", "fp8": FP8, FP8: FP8}
MODES = ("fwd", "bwd", "fwd_bwd", "prefill_varlen", "decode")
TRAINING_MODES = ("fwd", "bwd", "fwd_bwd")
INFERENCE_MODES = ("prefill_varlen", "decode")
Mode = Literal["fwd", "bwd", "fwd_bwd", "prefill_varlen", "decode"]
DEVICES = ("auto", "cuda", "cpu")

IntList = Union[int, list[int]]
# fp8 is checked against the reference of its dequantised inputs (so it measures the kernel, not
# the quantisation): its error is the rounding of the probabilities to e4m3 for p v, 3 mantissa
# bits, at most 2^-4 relative per element and about 2% RMS in the output (tests/tolerances.py).
DEFAULT_RTOL = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 5e-3, FP8: 5e-2}

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
# The longest spec name: with "tune-" before it and "-YYYYmmdd-HHMMSS-N" after, a file name.
MAX_NAME = 200
# What timing.warmup_ms and timing.rep_ms may ask for, per provider and case.
MAX_TIMING_MS = 60_000
# Strict: a YAML `true` is not the integer 1, and `64.5` or `"64"` are not integers.
_STRICT = ConfigDict(extra="forbid", strict=True)


# A provider's rows timed by CUDA-graph replay beside its eager ones (`timing.cuda_graph:
# [false, true]`) go under its name and this suffix, so the two key apart in resume, gate and
# plots (the results' key columns name the provider, not the timer).
GRAPH_SUFFIX = "+graph"
_GRAPH_VALUES = ("allowed: false (eager), true (graph replay), or [false, true] (both, in rows "
                 f"of their own: provider NAME{GRAPH_SUFFIX})")


def graph_row_name(provider: str) -> str:
    """The name a provider's graph-timed rows take beside its eager ones."""
    return provider + GRAPH_SUFFIX


def row_provider(name: str) -> tuple[str, bool]:
    """A row's provider name split into the provider and whether it is a graph-timed twin."""
    if name.endswith(GRAPH_SUFFIX):
        return name[:-len(GRAPH_SUFFIX)], True
    return name, False


class Timing(BaseModel):
    model_config = _STRICT
    # At most a minute each: past that a value is a typo (do_bench would call the step for days).
    warmup_ms: float = Field(25.0, gt=0, le=MAX_TIMING_MS, allow_inf_nan=False)
    rep_ms: float = Field(100.0, gt=0, le=MAX_TIMING_MS, allow_inf_nan=False)
    # false: each step timed eagerly; true: by CUDA-graph replay (dkbench.measure.graphs); [false,
    # true]: both, every provider's graph rows beside its eager ones under `graph_row_name`.
    cuda_graph: bool | list[bool] = False
    # Time a case's providers together, in rounds of one turn each (dkbench.measure.timing), so a drift of
    # the GPU's speed lands on all of them alike; `speedup` is then the median of per-round ratios.
    # Graph replay times one provider at a time, so cuda_graph: true turns this off unless it is
    # given too (an error); with [false, true] it applies to the eager rows.
    interleave: bool = True

    @field_validator("cuda_graph", mode="before")
    @classmethod
    def _graph_values(cls, value: Any) -> Any:
        """A boolean, or a list of distinct booleans; one value stands for itself."""
        if isinstance(value, bool):
            return value
        if not isinstance(value, list):
            raise AxisError(f"{show(value)} is not a boolean; {_GRAPH_VALUES}")
        if not value:
            raise AxisError(f"an empty list; {_GRAPH_VALUES}")
        for i, v in enumerate(value):
            if not isinstance(v, bool):
                raise AxisError(f"{show(v)} is not a boolean; {_GRAPH_VALUES}", i)
            if v in value[:i]:
                raise AxisError(f"{show(v)} is given twice; {_GRAPH_VALUES}", i)
        return value[0] if len(value) == 1 else [False, True]

    @model_validator(mode="after")
    def _graph_or_interleave(self) -> Timing:
        if self.cuda_graph is True and self.interleave:
            if "interleave" in self.model_fields_set:
                raise ValueError("timing.interleave and timing.cuda_graph are both true; pick one "
                                 "(graphs are replayed one provider at a time, so they cannot be "
                                 "interleaved), or time both ways with cuda_graph: [false, true]")
            self.interleave = False
        return self

    @property
    def graph_rows(self) -> bool:
        """Whether graph-timed rows come beside the eager ones (``cuda_graph: [false, true]``)."""
        return isinstance(self.cuda_graph, list)

    def eager_pass(self) -> Timing:
        """How the rows named after their provider are timed: this timing, with [false, true]
        its eager half."""
        return self.model_copy(update={"cuda_graph": False}) if self.graph_rows else self

    def graph_pass(self) -> Timing:
        """How graph-timed rows are timed: by replay, one provider at a time."""
        return self.model_copy(update={"cuda_graph": True, "interleave": False})


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
        seen: dict[str, str] = {}
        for name in given:  # bf16 and bfloat16 name one dtype: one value would be dropped
            if DTYPES[name] in seen:
                raise ValueError(f"{seen[DTYPES[name]]!r} and {name!r} both name "
                                 f"{DTYPES[name]}; allowed: one of them")
            seen[DTYPES[name]] = name
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
    # decode's KV cache: null is contiguous, a number the tokens per page of a paged one.
    table["page_size"] = ("a page size",
                          lambda v: v is None or (type(v) is int and v in PAGE_SIZES),
                          f"allowed: null (a contiguous cache), {', '.join(map(str, PAGE_SIZES))}")
    return table


# A union of a value and a list reports one error per branch in pydantic's words; these axes
# are checked first, in ours.
AXIS_VALUES = _axis_values()
_NULLABLE_AXES = ("batch", "batch_tokens", "q_len", "kv_heads", "page_size")


class Sweep(BaseModel):
    """A sweep spec as written in YAML (lists are the axes of a cartesian product)."""

    model_config = _STRICT
    # It starts the run directory's name (NAME-TIME, tune-NAME-TIME), which must fit in the
    # 255 bytes a file system allows a name.
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=MAX_NAME)
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
    # decode: an axis of KV-cache layouts, null a contiguous cache, a number pages of that many
    # tokens in a random order (one block table per case, seeded).
    page_size: Union[int, None, list[Optional[int]]] = None
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
        for i, v in enumerate(as_list(value)):
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
            if any(m not in INFERENCE_MODES for m in as_list(self.mode)):
                raise ValueError("lengths applies to the prefill_varlen and decode modes only")
            if self.batch_tokens is not None or (self.batch is not None and
                                                  as_list(self.batch) != [len(self.lengths)]):
                raise ValueError(f"with lengths the batch is their count ({len(self.lengths)}); "
                                 "leave out batch and batch_tokens")
            if min(self.lengths) < 1:
                raise ValueError("lengths must be positive (zero-length sequences are not allowed)")
            return self
        if (self.batch is None) == (self.batch_tokens is None):
            raise ValueError("give exactly one of 'batch' and 'batch_tokens'")
        if self.q_len is not None and any(m in INFERENCE_MODES for m in as_list(self.mode)):
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
    page_size: int = 0  # decode: tokens per page of a paged cache; 0 for a contiguous one

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
        if self.page_size:
            fields += (("page_size", self.page_size),)
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
                f"{self.pattern.label()}" + (f" page{self.page_size}" if self.page_size else ""))


CASE_KEYS = ("mode", "dtype", "batch", "seqlen", "q_len", "heads", "kv_heads", "head_dim",
             "causal", "pattern", "pattern_type", "block_size", "page_size", "provider")


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def expand(sweep: Sweep) -> list[Case]:
    """The cartesian product of every list axis, minus excluded cases, in a stable order."""
    return [case for case in product_cases(sweep)
            if not any(_matches(case, rule) for rule in sweep.exclude)]


def product_cases(sweep: Sweep) -> list[Case]:
    """Every case the axes make, before exclusions, each once and in a stable order.

    Two points of the product can be one case: ``batch_tokens: [64, 96]`` at ``seqlen: 64`` is
    batch 1 both times (``tokens // seqlen``). It is kept once, where it first comes: twice, it
    would be measured twice under one case_id (two rows of one key, a shard each)."""
    kv_heads = as_list(sweep.kv_heads) if sweep.kv_heads is not None else [None]
    batches = (as_list(sweep.batch) if sweep.batch is not None
               else [len(sweep.lengths)] if sweep.lengths else [None])
    tokens = as_list(sweep.batch_tokens) if sweep.batch_tokens is not None else [None]
    q_lens = as_list(sweep.q_len) if sweep.q_len is not None else [None]
    cases: dict[Case, None] = {}
    for (mode, dtype, seqlen, heads, kvh, dim, causal, pattern, batch, tok, q_len,
         page) in itertools.product(
            as_list(sweep.mode), as_list(sweep.dtype), as_list(sweep.seqlen),
            as_list(sweep.heads), kv_heads, as_list(sweep.head_dim), as_list(sweep.causal),
            sweep.patterns, batches, tokens, q_lens, as_list(sweep.page_size)):
        if page is not None and mode != "decode":
            continue  # only decode reads a KV cache (the spec's check says so)
        if mode == "decode":
            q_len = 1  # one new token per sequence
        case = Case(mode=mode, dtype=DTYPES.get(dtype, dtype),
                    batch=batch if batch is not None else tok // seqlen, seqlen=seqlen,
                    q_len=q_len if q_len is not None else seqlen, heads=heads,
                    kv_heads=kvh if kvh is not None else heads, head_dim=dim, causal=causal,
                    pattern=pattern, sm_scale=sweep.sm_scale, seed=sweep.seed,
                    length_spread=sweep.length_spread if mode in INFERENCE_MODES else 0.0,
                    lengths=tuple(sweep.lengths) if sweep.lengths else None,
                    page_size=page or 0)
        cases.setdefault(case, None)
    return list(cases)


def _matches(case: Case, rule: dict[str, Any], provider: str | None = None) -> bool:
    for key, wanted in rule.items():
        if key == "provider":
            # A rule naming a provider excludes rows, not whole cases.
            if provider is None or not _names_row(wanted, provider):
                return False
            continue
        value = case.field(key)
        if key == "dtype":
            wanted = [DTYPES.get(w, w) for w in as_list(wanted)]
        if key == "page_size":
            wanted = [0 if w is None else w for w in as_list(wanted)]  # null: contiguous
        if value not in as_list(wanted) and str(value) not in [str(w) for w in as_list(wanted)]:
            return False
    return True


def idle_exclusions(sweep: Sweep, providers: Sequence[str] | None = None) -> list[str]:
    """A note for each `exclude` rule that matches no case of the spec's axes (legal values in a
    combination that never occurs, such as ``{seqlen: 32, heads: 4}`` where heads are 2), or
    names only providers that do not run (``providers``: those that do, by default the spec's).
    It leaves nothing out, which may not be what was meant."""
    cases = product_cases(sweep)
    running = list(providers if providers is not None else sweep.providers)
    rows = running + ([graph_row_name(p) for p in running] if sweep.timing.graph_rows else [])
    notes = []
    for index, rule in enumerate(sweep.exclude):
        shape = {key: value for key, value in rule.items() if key != "provider"}
        if not any(_matches(case, shape) for case in cases):
            notes.append(f"exclude[{index}] {rule} matches no case of the spec: it leaves "
                         "nothing out")
        elif "provider" in rule and not any(_names_row(rule["provider"], r) for r in rows):
            notes.append(f"exclude[{index}] {rule} names no provider that runs here (rows: "
                         f"{', '.join(rows)}): it leaves nothing out")
    return notes


def idle_config(sweep: Sweep, providers: Sequence[str] | None = None) -> list[str]:
    """A note when the spec sets `config` but the bundled kernel's provider does not run
    (``providers``: those that do, by default the spec's): the config then does nothing."""
    running = providers if providers is not None else sweep.providers
    if sweep.config is None or BUNDLED_PROVIDER in running:
        return []
    return [f"config applies to the bundled kernel (provider {BUNDLED_PROVIDER}), which does not "
            f"run here (providers: {', '.join(running)}): it does nothing"]


def _names_row(wanted: Any, row: str) -> bool:
    """Whether an exclusion's provider value takes this row: a provider takes its graph rows
    too, NAME+graph only them."""
    return row in as_list(wanted) or row_provider(row)[0] in as_list(wanted)


def excluded_for_provider(sweep: Sweep, case: Case, provider: str) -> bool:
    """True when an exclusion rule that names a provider removes this case x provider."""
    return any("provider" in rule and _matches(case, rule, provider) for rule in sweep.exclude)


# `--only` keys whose values are integers: ``8k`` is 8192 there, ``064`` is 64.
_ONLY_INT_KEYS = ("batch", "seqlen", "q_len", "heads", "kv_heads", "head_dim", "block_size",
                  "page_size")


def _only_values(item: str, key: str, value: str) -> list[str]:
    """The values one ``--only KEY=VALUE`` names, spelt as `Case.field` prints them (lowercase)."""
    # Pattern labels hold commas inside parentheses: split only on the others.
    values = [v.strip().lower() for v in re.split(r",(?![^()]*\))", value)]
    if key == "dtype":
        values = [DTYPES.get(v, v) for v in values]
    if key in _ONLY_INT_KEYS:
        spelt = []
        for v in values:
            # [0-9], not \d: a full-width or other Unicode digit is no integer the spec can hold.
            match = re.fullmatch(r"([0-9]+)\s*(k?)", v)
            if match:
                v = str(int(match[1]) * (1024 if match[2] else 1))
            elif key == "page_size" and v in ("null", "none"):
                v = "0"  # a contiguous cache, as the spec writes it
            else:
                _malformed(item, key, value, _int_form(key))
            spelt.append(v)
        values = spelt
    elif "" in values or (key != "pattern" and "=" in value):  # a file pattern's name may hold =
        _malformed(item, key, value, "a value, or a comma list of values")
    return values


def _int_form(key: str) -> str:
    null = ", or null (a contiguous cache)" if key == "page_size" else ""
    return f"integers such as 64 or 8k (8192), comma-separated{null}"


def _malformed(item: str, key: str, value: str, form: str) -> NoReturn:
    raise SpecError(f"--only {item!r}: malformed value {value!r} for {key}; expected {form}")


def parse_only(only: list[str]) -> dict[str, tuple[list[str], list[str]]]:
    """``--only`` items grouped by key: key -> (the items as given, the values they name).

    Items of one key are one list of values (``--only seqlen=32 --only seqlen=64`` is
    ``seqlen=32,64``): a case has one value per key, so requiring both would keep nothing."""
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for item in only:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in CASE_KEYS or key == "provider":
            raise SpecError(f"--only {item!r}: expected KEY=VALUE with KEY one of "
                            f"{', '.join(k for k in CASE_KEYS if k != 'provider')}")
        items, values = groups.setdefault(key, ([], []))
        items.append(item)
        values.extend(_only_values(item, key, value))
    return groups


def only_mismatch(cases: list[Case], only: list[str]) -> str:
    """Why ``--only`` keeps none of ``cases``: the first key whose values leave nothing, with
    the values the cases have for it (``"; seqlen=96 matches none: the cases have seqlen 32,
    64"``), or nothing when each key matches on its own (only their combination is empty)."""
    for key, (items, _) in parse_only(only).items():
        if not filter_cases(cases, items):
            have = sorted({str(c.field(key)).lower() for c in cases},
                          key=lambda v: (len(v), v) if v.isdigit() else (0, v))
            return f"; {' '.join(items)} matches none: the cases have {key} {', '.join(have)}"
    return ""


def filter_cases(cases: list[Case], only: list[str]) -> list[Case]:
    """Keep cases matching every key of ``--only`` (``KEY=VALUE``, comma-separated values allowed;
    a key given twice takes the values of both)."""
    for key, (_, values) in parse_only(only).items():
        cases = [c for c in cases if str(c.field(key)).lower() in values]
    return cases
