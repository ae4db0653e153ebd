"""`dkbench tune` flags that took a malformed value as another one: search-space lists with an
empty item (`16,,32`) or digits int() is lenient about (`1_6`, a full-width `16`), and empty
paths (`--out ""` tuned into the current directory). Each is refused in one line (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dkbench.errors import BadInputError
from dkbench.tune.space import parse_impl_list, parse_int_list

from .cli_helpers import invoke
from .test_break_run import refused


@pytest.mark.parametrize(("text", "why"), [
    ("16,,32", "an empty item between commas"),  # was (16, 32)
    ("16,", "an empty item between commas"),  # was (16,)
    ("1_6", "'1_6' is not an integer"),  # was 16
    ("\uff11\uff16", "'\uff11\uff16' is not an integer"),  # full-width 16: was 16
])
def test_int_list_refuses_malformed_items(text: str, why: str) -> None:
    with pytest.raises(BadInputError) as info:
        parse_int_list(text, "--block-m")
    assert str(info.value) == (f"--block-m {text!r}: {why}; expected comma-separated integers "
                               "(e.g. 32,64)")


@pytest.mark.parametrize("text", ["triton,,fused", "triton,"])  # were (triton, fused), (triton,)
def test_impl_list_refuses_an_empty_item(text: str) -> None:
    with pytest.raises(BadInputError, match="an empty item between commas; allowed values are"):
        parse_impl_list(text)


def test_well_formed_lists_still_parse() -> None:
    assert parse_int_list(" 16 , 32,16 ", "--block-m") == (16, 32)
    assert parse_impl_list("fused, triton") == ("fused", "triton")


@pytest.mark.parametrize("flag", ["--block-m", "--block-n", "--num-warps", "--num-stages"])
def test_tune_refuses_an_empty_item(flag: str) -> None:
    refused(invoke("tune", "--device", "cpu", "--dry-run", flag, "4,,8"),
            f"{flag} '4,,8': an empty item between commas")


@pytest.mark.parametrize(("args", "flag"), [
    (["--out", ""], "--out"), (["--cache", ""], "--cache"), ([""], "SPEC")])
def test_tune_refuses_an_empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    args: list[str], flag: str) -> None:
    # --out "" was Path("."): the tune directory landed in the current directory.
    monkeypatch.chdir(tmp_path)
    refused(invoke("tune", "--device", "cpu", "--dry-run", *args), f"{flag} '': names no path")
    assert list(tmp_path.iterdir()) == []
