"""Fixtures the harness tests share (the root conftest sets up the interpreter and devices)."""

import pytest


@pytest.fixture
def nothing_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any preparing, timing or compiling of a tune candidate fails the test: for refusals that
    must come before the tune measures anything."""
    from dkbench.measure import runner
    from dkbench.tune import precompile

    def boom(*args, **kwargs):
        raise AssertionError("tune prepared or timed a candidate before its checks")

    for name in ("prepare_one", "run_one", "measure_interleaved", "measure"):
        monkeypatch.setattr(runner, name, boom)
    monkeypatch.setattr(precompile.Compiler, "run", boom)


@pytest.fixture
def cache_env(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """A private cache file that both tune (--cache) and the kernels' lookup (env var) use."""
    import kernels.select as select
    from kernels.config_cache import ENV_VAR

    path = tmp_path / "configs.json"
    monkeypatch.setenv(ENV_VAR, str(path))
    select.clear_memo()
    yield path
    select.clear_memo()
