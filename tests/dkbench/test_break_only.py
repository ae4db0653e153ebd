"""`--only KEY=VALUE` values that are malformed (empty, holding another `=`, digits that are not
ASCII): refused in one line naming the flag, the key, the value and the form allowed (exit 2),
by `dkbench run` and by a resume, rather than said to match no case, or taken as another value."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dkbench.errors import SpecError
from dkbench.results import schema as results
from dkbench.results.schema import read_meta
from dkbench.spec.sweep import parse_only

from .cli_helpers import invoke, run_to_end
from .specs import write_spec
from .test_break_run import refused

INTS = "expected integers such as 64 or 8k (8192), comma-separated"


@pytest.mark.parametrize(("item", "value", "key", "form"), [
    ("seqlen=", "", "seqlen", INTS),  # was: matches none
    ("seqlen=32=64", "32=64", "seqlen", INTS),  # was: matches none
    ("seqlen=\uff13\uff12", "\uff13\uff12", "seqlen", INTS),  # full-width 32: was taken as 32
    ("heads=2,,4", "2,,4", "heads", INTS),  # was: 2 and 4, the empty item dropped
    ("page_size=x", "x", "page_size", INTS + ", or null"),
    ("dtype=", "", "dtype", "expected a value, or a comma list of values"),
    ("mode=fwd=bwd", "fwd=bwd", "mode", "expected a value, or a comma list of values"),
])
def test_malformed_only_value_is_refused(item: str, value: str, key: str, form: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_only([item])
    assert str(info.value).startswith(
        f"--only {item!r}: malformed value {value!r} for {key}; {form}"), info.value


@pytest.mark.parametrize(("item", "values"), [
    ("seqlen= 32 , 8k", ["32", "8192"]), ("page_size=null", ["0"]), ("dtype=bf16", ["bfloat16"]),
])
def test_well_formed_only_values_still_parse(item: str, values: list[str]) -> None:
    (parsed,) = parse_only([item]).values()
    assert parsed == ([item], values)


@pytest.mark.parametrize("item", ["seqlen=", "seqlen=32=64", "seqlen=\uff13\uff12"])
def test_run_refuses_a_malformed_only(tmp_path: Path, item: str) -> None:
    out = tmp_path / "out"
    result = invoke("run", write_spec(tmp_path, seqlen=[32, 64]), "--out", out, "-q",
                    "--only", item)
    refused(result, f"--only {item!r}: malformed value", "for seqlen; " + INTS)
    assert not out.exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("finished")
    return run_to_end(write_spec(folder, seqlen=[32, 64]), folder / "out", "--only", "seqlen=32")


def test_resume_refuses_a_malformed_only(finished: Path, tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(finished, tmp_path / finished.name))
    result = invoke("run", "--resume", run_dir, "--only", "seqlen=64=32", "-q")
    refused(result, "--only 'seqlen=64=32': malformed value '64=32' for seqlen")


def test_resume_refuses_a_malformed_recorded_only(finished: Path, tmp_path: Path) -> None:
    # A meta.json an older dkbench wrote, when the full-width digits ran as 64.
    run_dir = Path(shutil.copytree(finished, tmp_path / finished.name))
    results.write_meta(run_dir, {**read_meta(run_dir), "only": ["seqlen=\uff16\uff14"]})
    result = invoke("run", "--resume", run_dir, "-q")
    text = refused(result, "--only 'seqlen=\uff16\uff14': malformed value")
    # Was the --only error alone, blaming a flag the user did not pass: the file and its key,
    # that the value is stale, and the ways out.
    assert text.startswith(f"error: --resume {run_dir}: {run_dir / 'meta.json'}: key 'only' "
                           'holds ["seqlen=\\uff16\\uff14"], which is not valid for this '
                           "dkbench (an older one recorded it): the recorded --only "), text
    assert "pass --only explicitly to replace it, or start a fresh run" in text, text


def test_resume_with_an_explicit_only_replaces_a_malformed_recorded_one(finished: Path,
                                                                         tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(finished, tmp_path / finished.name))
    results.write_meta(run_dir, {**read_meta(run_dir), "only": ["seqlen=\uff16\uff14"]})
    result = invoke("run", "--resume", run_dir, "--only", "seqlen=64", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(results.read_results(run_dir)["seqlen"].tolist()) == [32, 64]
    assert invoke("run", "--resume", run_dir, "-q").exit_code == 0  # no longer stopped by it
