"""The peer providers' CPU-checkable parts: spec options, library refusals, GQA expansion."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dkbench.errors import SpecError
from dkbench.measure import runner
from dkbench.measure.providers import PROVIDERS, Prepared, Provider, Unsupported
from dkbench.measure.providers.base import MaskBlocks
from dkbench.measure.providers.fa4 import Fa4, Fa4Sparse
from dkbench.measure.providers.flex import Flex, FlexFlash
from dkbench.measure.providers.sdpa import SdpaEfficient, _repeat_kv
from dkbench.results.schema import ResultRow
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import expand

from .specs import write_spec

CPU = torch.device("cpu")


def test_provider_options_reach_the_provider(tmp_path: Path) -> None:
    sweep = load_spec(write_spec(tmp_path, providers=["sdpa_math", "fa4_sparse"],
                                 provider_options={"fa4_sparse": {"fwd_block": [128, 64]}}))
    options = Fa4Sparse().options(sweep)
    assert options.fwd_block == (128, 64) and options.bwd_block is None
    assert Flex().options(sweep) == MaskBlocks()  # no entry: the defaults


@pytest.mark.parametrize(("options", "message"), [
    ({"fa4_sparse": {"fwd_blok": [128, 64]}},
     "provider_options.fa4_sparse.fwd_blok: unknown key; allowed keys here: bwd_block, fwd_block"),
    ({"fa4_sparse": {"fwd_block": [100, 64]}},
     "provider_options.fa4_sparse.fwd_block[0]: must be a multiple of 16, got 100"),
    ({"fa4_sparse": {"fwd_block": [128]}}, "provider_options.fa4_sparse.fwd_block"),
    ({"flex": {"fwd_block": [128, 128]}}, "provider_options.flex: 'flex' is not in providers"),
    ({"sdpa_math": {"x": 1}}, "provider_options.sdpa_math: sdpa_math takes no options"),
    ({"fa4_sparse": [128, 64]}, "provider_options.fa4_sparse"),
])
def test_bad_provider_options_name_the_key(tmp_path: Path, options: dict, message: str) -> None:
    path = write_spec(tmp_path, providers=["sdpa_math", "fa4_sparse"], provider_options=options)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_mask_block_defaults_follow_the_mode(tmp_path: Path) -> None:
    sweep = load_spec(write_spec(tmp_path, mode=["fwd", "fwd_bwd"], providers=["sdpa_math"]))
    fwd, train = expand(sweep)
    layout = fwd.pattern.layout(fwd.heads, fwd.kv_heads, fwd.seqlen, fwd.causal)
    none = MaskBlocks()
    assert Flex().mask_block(fwd, layout, none) == (128, 128)
    assert FlexFlash().mask_block(fwd, layout, none) == (128, 64)
    assert FlexFlash().mask_block(train, layout, none) == (128, 128)
    pinned = MaskBlocks(fwd_block=(64, 64), bwd_block=(64, 128))
    assert FlexFlash().mask_block(fwd, layout, pinned) == (64, 64)
    assert FlexFlash().mask_block(train, layout, pinned) == (64, 128)


def test_library_refusals_are_named_and_nothing_else_is() -> None:
    reason = Fa4().refused(AssertionError("SplitKV not supported on SM 9.0"))
    assert reason == "fa4 refused this case: AssertionError: SplitKV not supported on SM 9.0"
    assert Fa4().refused(RuntimeError("CUDA error")) is None
    assert Fa4().refused(Unsupported("no")) is None
    assert PROVIDERS["sdpa_math"]().refused(ValueError("x")) is None  # it declares no refusals


class _Refusing(Provider):
    name = "refusing"
    refusals = (ValueError,)

    def prepare(self, *args, **kwargs) -> Prepared:
        raise ValueError("block size 48 is not a multiple of 64")


class _Broken(_Refusing):
    name = "broken"
    refusals = ()


@pytest.mark.parametrize(("cls", "status", "message"), [
    (_Refusing, "unsupported", "refusing refused this case: ValueError: block size 48"),
    (_Broken, "error", "ValueError: block size 48"),
])
def test_a_refusal_makes_an_unsupported_row(tmp_path: Path, monkeypatch, cls: type, status: str,
                                            message: str) -> None:
    monkeypatch.setitem(PROVIDERS, cls.name, cls)
    path = write_spec(tmp_path, providers=["sdpa_math", cls.name])
    sweep = load_spec(path)
    plan = runner.plan_run(sweep, expand(sweep), sweep.providers, tmp_path / "out", None)
    rows: list[ResultRow] = runner.execute(sweep, path.read_text(), plan, CPU)
    row = next(r for r in rows if r.provider == cls.name)
    assert row.status == status and row.message.startswith(message), row.message


def test_repeat_kv_gives_each_query_head_its_groups_kv() -> None:
    kv = torch.randn(2, 3, 5, 4)
    out = _repeat_kv(kv, 6)
    assert out.shape == (2, 6, 5, 4)
    for h in range(6):
        assert torch.equal(out[:, h], kv[:, h // 2])


def test_sdpa_efficient_expands_gqa_and_says_so() -> None:
    assert SdpaEfficient.expands_gqa
    assert not any(PROVIDERS[p].expands_gqa for p in ("sdpa_flash", "sdpa_cudnn", "sdpa_math"))


def test_fa4s_compile_cache_is_turned_on_beside_the_config_cache(tmp_path: Path,
                                                                 monkeypatch) -> None:
    from dkbench.measure.providers import fa4

    monkeypatch.setenv("DKBENCH_CACHE", str(tmp_path / "configs.json"))
    for name in (fa4.CACHE_ENABLED_VAR, fa4.CACHE_DIR_VAR):  # unset, and unset again after
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    fa4.keep_compiles_on_disk()
    assert os.environ[fa4.CACHE_ENABLED_VAR] == "1"
    assert os.environ[fa4.CACHE_DIR_VAR] == str(tmp_path / "fa4-cute")


def test_a_users_fa4_cache_setting_is_kept(tmp_path: Path, monkeypatch) -> None:
    from dkbench.measure.providers import fa4

    monkeypatch.setenv(fa4.CACHE_ENABLED_VAR, "0")
    monkeypatch.setenv(fa4.CACHE_DIR_VAR, str(tmp_path / "mine"))
    fa4.keep_compiles_on_disk()
    assert os.environ[fa4.CACHE_ENABLED_VAR] == "0"
    assert os.environ[fa4.CACHE_DIR_VAR] == str(tmp_path / "mine")
