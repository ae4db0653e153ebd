"""The launch-config lookup of every kernel: varlen and decode take pinned configs and read
their own cache entries, and shipped configs serve the other GPUs of their architecture."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import kernels.inference
from kernels import (
    LaunchConfig,
    local_stride_layout,
    random_layout,
    reference_attention,
    select,
    sparse_attention_decode,
    sparse_attention_padded,
    sparse_attention_varlen,
)
from kernels.config_cache import ENV_VAR, ConfigCache
from kernels.configs import default_config
from tests.kernels.cases import make_layout
from tests.tolerances import assert_verbose_close, rel_tol

CPU = torch.device("cpu")


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ConfigCache, Path]:
    """The user cache the lookup reads ($DKBENCH_CACHE), and a shipped directory of our own."""
    user = ConfigCache(tmp_path / "user" / "configs.json")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setenv(ENV_VAR, str(user.path))
    monkeypatch.setattr(select, "SHIPPED_DIR", shipped)
    select.clear_memo()
    select._shipped.cache_clear()
    yield user, shipped
    select.clear_memo()
    select._shipped.cache_clear()


def put(cache: ConfigCache, key, config: LaunchConfig) -> None:
    cache.put(key, config.as_dict(), ms=1.0, default_ms=2.0)
    select.clear_memo()
    select._shipped.cache_clear()


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[LaunchConfig]]:
    """The configs the varlen and decode launchers receive, call by call."""
    seen: dict[str, list[LaunchConfig]] = {"varlen": [], "decode": []}
    varlen, decode = (kernels.inference.sparse_attention_fwd_varlen,
                      kernels.inference.sparse_attention_decode_fwd)

    def varlen_spy(q, k, v, seqs, layout, scale, config, out):
        seen["varlen"].append(config)
        return varlen(q, k, v, seqs, layout, scale, config, out)

    def decode_spy(q, k, v, lens, layout, scale, splits, config, **paged):
        seen["decode"].append(config)
        return decode(q, k, v, lens, layout, scale, splits, config, **paged)

    monkeypatch.setattr(kernels.inference, "sparse_attention_fwd_varlen", varlen_spy)
    monkeypatch.setattr(kernels.inference, "sparse_attention_decode_fwd", decode_spy)
    return seen


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def varlen_problem(device):
    lens = [120, 64, 33]
    layout = make_layout("hetero", 2, 1, 128, 32)
    q = torch.randn(sum(lens), 2, 32, device=device)
    k = torch.randn(sum(lens), 1, 32, device=device)
    v = torch.randn_like(k)
    return layout, lens, q, k, v


def check_varlen(out, layout, lens, q, k, v) -> None:
    cu = _cu(lens)
    for i in range(len(lens)):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        ref = reference_attention(q[rows][None], k[rows][None], v[rows][None], layout)[0]
        assert_verbose_close(out[rows], ref, rel_tol(q.dtype, q.device), f"sequence {i}")


def decode_problem(device):
    lens = torch.tensor([100, 7, 128])
    layout = make_layout("hetero", 4, 2, 128, 32)
    q = torch.randn(3, 4, 32, device=device)
    k = torch.randn(3, 128, 2, 32, device=device)
    v = torch.randn_like(k)
    return layout, lens, q, k, v


def check_decode(out, layout, lens, q, k, v) -> None:
    for b, n in enumerate(lens.tolist()):
        ref = reference_attention(q[b:b + 1, None], k[b:b + 1, :n], v[b:b + 1, :n], layout)[0, 0]
        assert_verbose_close(out[b], ref, rel_tol(q.dtype, q.device), f"sequence {b}")


# -- configs pinned through the API ---------------------------------------------------------------


def test_a_pinned_varlen_config_runs_and_a_bad_one_is_named(device, launches, poison_outputs):
    layout, lens, q, k, v = varlen_problem(device)
    pinned = LaunchConfig(16, 16, 2, 1)  # not the default
    assert pinned != default_config("varlen", q.device, 32, 32, q.dtype)
    out = sparse_attention_varlen(q, k, v, _cu(lens), _cu(lens), layout, config=pinned)
    assert launches["varlen"] == [pinned]
    check_varlen(out, layout, lens, q, k, v)
    with pytest.raises(ValueError, match=r"invalid launch config m32n64w4s1: block_n=64 must not "
                                         r"exceed the sparse block size 32"):
        sparse_attention_varlen(q, k, v, _cu(lens), _cu(lens), layout,
                                config=LaunchConfig(32, 64, 4, 1))
    padded = q.new_zeros(3, 128, 2, 32)
    with pytest.raises(ValueError, match="invalid launch config m48n16w4s1: block_m=48"):
        sparse_attention_padded(padded, padded[..., :1, :], padded[..., :1, :],
                                torch.tensor(lens), layout, config=LaunchConfig(48, 16, 4, 1))
    assert launches["varlen"] == [pinned]  # nothing launched for the bad ones


@pytest.mark.parametrize("splits", [None, 3])
def test_a_pinned_decode_config_runs_and_a_bad_one_is_named(splits, device, launches,
                                                            poison_outputs):
    layout, lens, q, k, v = decode_problem(device)
    pinned = LaunchConfig(16, 16, 2, 1)
    assert pinned != default_config("decode", q.device, 32, 32, q.dtype)
    out = sparse_attention_decode(q, k, v, lens, layout, num_splits=splits, config=pinned)
    assert launches["decode"] == [pinned]
    check_decode(out, layout, lens, q, k, v)
    for bad, problem in ((LaunchConfig(32, 16, 2, 1), "block_m=32 must be 16 for decoding"),
                         (LaunchConfig(16, 16, 2, 1000), "num_stages=1000 must be 1 to 8"),
                         (LaunchConfig(16, 64, 2, 1),
                          "block_n=64 must not exceed the sparse block size 32"),
                         (LaunchConfig(128, 128, 4, 3, "gluon"),
                          "runs the fwd, bwd, dq, fp8 kernels only")):
        with pytest.raises(ValueError, match=f"invalid launch config {bad.short()}: .*{problem}"):
            sparse_attention_decode(q, k, v, lens, layout, config=bad)
    assert launches["decode"] == [pinned]


# -- each kernel's own cache entries ---------------------------------------------------------------


def test_varlen_reads_its_own_cache_entries(caches, device, launches, poison_outputs):
    user, _ = caches
    layout, lens, q, k, v = varlen_problem(device)
    seq_k = max(lens)
    density = select.block_density(layout.to(q.device), seq_k)
    tuned, forward = LaunchConfig(16, 16, 4, 1), LaunchConfig(32, 16, 4, 1)
    # The forward's entry for the same problem is not the varlen kernel's.
    put(user, select.cache_key("fwd", q.device, q.dtype, 32, 32, seq_k, density), forward)
    default = default_config("varlen", q.device, 32, 32, q.dtype)
    assert kernels.resolve_varlen_config(q[:1, None], layout, seq_k) == (default, "default")
    put(user, select.cache_key("varlen", q.device, q.dtype, 32, 32, seq_k, density), tuned)
    assert kernels.resolve_varlen_config(q[:1, None], layout, seq_k) == (tuned, "cache")
    out = sparse_attention_varlen(q, k, v, _cu(lens), _cu(lens), layout)
    assert launches["varlen"] == [tuned]
    check_varlen(out, layout, lens, q, k, v)


def test_a_gluon_entry_under_varlen_is_skipped(caches):
    user, _ = caches
    layout, _, q, _, _ = varlen_problem("cpu")
    key = select.cache_key("varlen", CPU, q.dtype, 32, 32, 120,
                           select.block_density(layout, 120))
    put(user, key, LaunchConfig(128, 128, 4, 3, "gluon"))
    assert select.resolve_config("varlen", q[:1, None], layout, 120) == (
        default_config("varlen", CPU, 32, 32, q.dtype), "default")


def test_a_cached_config_of_1000_stages_is_skipped(caches):
    """Was: taken from the cache and launched; no kernel holds that many stages."""
    user, _ = caches
    put(user, key_for(), LaunchConfig(16, 16, 4, 1000))
    assert lookup() == (default_config("fwd", CPU, 32, 32, torch.float32), "default")
    put(user, key_for(), LaunchConfig(16, 16, 4, 8))  # the deepest pipeline a config may ask
    assert lookup() == (LaunchConfig(16, 16, 4, 8), "cache")


def test_decode_reads_its_own_cache_entries(caches, device, launches, poison_outputs):
    user, _ = caches
    layout, lens, q, k, v = decode_problem(device)
    max_len = k.shape[1]
    density = select.block_density(layout.to(q.device), max_len)
    tuned = LaunchConfig(16, 16, 2, 1)
    put(user, select.cache_key("fwd", q.device, q.dtype, 32, 32, max_len, density),
        LaunchConfig(16, 32, 8, 1))
    sparse_attention_decode(q, k, v, lens, layout)
    assert launches["decode"] == [default_config("decode", q.device, 32, 32, q.dtype)]
    put(user, select.cache_key("decode", q.device, q.dtype, 32, 32, max_len, density), tuned)
    assert select.resolve_config("decode", q, layout, max_len) == (tuned, "cache")
    out = sparse_attention_decode(q, k, v, lens, layout)
    assert launches["decode"][1:] == [tuned]
    check_decode(out, layout, lens, q, k, v)


# -- shipped configs across one architecture -------------------------------------------------------

H100, H200, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB"


@pytest.fixture
def on_h200(monkeypatch: pytest.MonkeyPatch):
    """Every device reads as an H200 (compute capability 9.0) to the lookup."""
    monkeypatch.setattr(select, "device_identity", lambda device: (H200, "9.0"))
    select.clear_memo()
    yield
    select.clear_memo()


def lookup(kernel: str = "fwd") -> tuple[LaunchConfig, str]:
    layout = make_layout("homo", 1, 1, 128, 32)
    return select.resolve_config(kernel, torch.empty(1, 1, 1, 32), layout, 128)


def key_for(kernel: str = "fwd", **fields):
    layout = make_layout("homo", 1, 1, 128, 32)
    key = select.cache_key(kernel, CPU, torch.float32, 32, 32, 128,
                           select.block_density(layout, 128))
    return dataclasses.replace(key, **fields)


def test_another_gpu_of_the_same_capability_serves_its_shipped_configs(caches, on_h200):
    _, shipped = caches
    default = lookup()
    assert default == (default_config("fwd", CPU, 32, 32, torch.float32), "default")
    # Another architecture's entry (8.0) is not this GPU's.
    put(ConfigCache(shipped / "a100.json"), key_for(gpu=A100, capability="8.0"),
        LaunchConfig(32, 16, 4, 1))
    assert lookup() == default
    # An H100's (9.0) is, and says whose it is.
    h100 = LaunchConfig(16, 16, 4, 1)
    put(ConfigCache(shipped / "h100.json"), key_for(gpu=H100, capability="9.0"), h100)
    assert lookup() == (h100, f"shipped:{H100}")
    # Only for the kernel it was tuned for.
    assert lookup("dq")[1] == "default"
    # This GPU's own entry comes first, then the user's cache.
    own = LaunchConfig(32, 32, 2, 1)
    put(ConfigCache(shipped / "h200.json"), key_for(gpu=H200, capability="9.0"), own)
    assert lookup() == (own, "shipped")
    user = LaunchConfig(16, 32, 4, 1)
    put(caches[0], key_for(gpu=H200, capability="9.0"), user)
    assert lookup() == (user, "cache")


def test_the_architecture_fallback_takes_a_usable_entry_by_gpu_name(caches, on_h200):
    _, shipped = caches
    file = ConfigCache(shipped / "hopper.json")
    # A config this block size cannot run (hand-edited) is passed over for the next GPU's.
    put(file, key_for(gpu="NVIDIA GH200 480GB", capability="9.0"), LaunchConfig(64, 64, 4, 1))
    put(file, key_for(gpu="NVIDIA H800", capability="9.0"), LaunchConfig(16, 16, 2, 1))
    put(file, key_for(gpu=H100, capability="9.0"), LaunchConfig(32, 16, 2, 1))
    assert lookup() == (LaunchConfig(32, 16, 2, 1), f"shipped:{H100}")


def test_step_form_tells_patterns_of_owned_steps_apart():
    seq_k = 64 * 64
    rand = random_layout(4, 64, 64, 0.2, seed=0)
    phi3 = local_stride_layout(4, seq_k, 64, 16, 8, head_sliding_offset=1)
    assert select.step_form("fwd", rand, seq_k) == select.step_form("dq", rand, seq_k) == "owned"
    assert select.step_form("fwd", phi3, seq_k) == select.step_form("dq", phi3, seq_k) == "union"
    # The kernels without owned steps, and blocks the owned steps do not take.
    assert select.step_form("bwd", rand, seq_k) == "union"
    assert select.step_form("fwd", random_layout(4, 32, 128, 0.2), seq_k) == "union"


def test_configs_tuned_on_one_step_form_never_serve_the_other(caches):
    """A random pattern and phi-3's can share a length and density bucket; the forward's and dq
    kernel's configs tuned on one must not reach the other (they run other kernels)."""
    user, _ = caches
    seq_k = 64 * 64
    rand = random_layout(2, 64, 64, 0.2, seed=0)
    q = torch.empty(1, 1, 1, 64)
    density = select.block_density(rand, seq_k)

    def key(kernel: str, steps: str):
        return select.cache_key(kernel, CPU, q.dtype, 64, 64, seq_k, density, steps)

    tuned = LaunchConfig(32, 32, 4, 1)
    for kernel in ("fwd", "dq", "bwd"):
        put(user, key(kernel, "union"), tuned)
    assert select.resolve_config("fwd", q, rand, seq_k)[1] == "default"
    assert select.resolve_config("dq", q, rand, seq_k)[1] == "default"
    assert select.resolve_config("bwd", q, rand, seq_k) == (tuned, "cache")  # one form only
    put(user, key("fwd", "owned"), tuned)
    assert select.resolve_config("fwd", q, rand, seq_k) == (tuned, "cache")


def test_no_architecture_fallback_off_a_gpu(caches):
    """The interpreter's identity has no compute capability: only exact entries serve it."""
    _, shipped = caches
    put(ConfigCache(shipped / "cpu.json"), key_for(gpu="cpu (another name)"),
        LaunchConfig(16, 16, 4, 1))
    assert lookup()[1] == "default"
    put(ConfigCache(shipped / "cpu.json"), key_for(), LaunchConfig(16, 16, 4, 1))
    assert lookup() == (LaunchConfig(16, 16, 4, 1), "shipped")
