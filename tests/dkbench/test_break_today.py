"""Bad input against the day's features (graph rows, fp8 cases, the setup_ms column): each refused
in one line naming the file or flag, the key and what is allowed, with exit code 2; and fp8 specs,
once refused by the tune, planned."""

from __future__ import annotations

from pathlib import Path

from dkbench.results.schema import rewrite_results

from .cli_helpers import flat, invoke, run_to_end
from .specs import write_spec

BOTH = {"warmup_ms": 1, "rep_ms": 1, "cuda_graph": [False, True]}


def _refused(result, *words: str) -> str:
    text = flat(result.output)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in text
    for word in words:
        assert word in text, text
    return text


def test_tune_plans_the_fp8_forward_of_an_fp8_spec(tmp_path: Path) -> None:
    """Was refused ("dtype: fp8 is not tuned"): the fp8 forward is tuned now."""
    spec = write_spec(tmp_path, providers=["dkbench"], dtype="fp8")
    result = invoke("tune", spec, "--device", "cpu", "--dry-run", "--out", tmp_path / "out",
                    "--cache", tmp_path / "cache.json")
    text = flat(result.output)
    assert result.exit_code == 0 and "Traceback" not in text, result.output
    assert "│ fp8 │ m32n32w4s1 │ run (default, reference)" in text
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_tune_plans_fp8_from_the_shape_flags(tmp_path: Path) -> None:
    result = invoke("tune", "--device", "cpu", "--dtype", "float8_e4m3fn", "--dry-run",
                    "--cache", tmp_path / "cache.json")
    assert result.exit_code == 0, result.output
    assert "│ fp8 │ m32n32w4s1 │ run (default, reference)" in flat(result.output)


def test_tune_refuses_rows_timed_both_ways(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, providers=["dkbench"], timing=BOTH)
    result = invoke("tune", spec, "--device", "cpu", "--dry-run",
                    "--cache", tmp_path / "cache.json")
    _refused(result, f"{spec}: timing.cuda_graph: [false, true]", "allowed: false", "true")


def test_an_exclusion_of_a_misspelt_graph_provider_is_refused(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, providers=["sdpa_math"], timing=BOTH,
                      exclude=[{"provider": ["sdpa_math+grahp"]}])
    _refused(invoke("validate", spec), f"{spec}: exclude[0].provider: unknown provider "
             "'sdpa_math+grahp'; allowed:", "+graph")
    # A known provider's graph rows may be named, in the spec or not (--providers may add it).
    fine = write_spec(tmp_path, "fine.yaml", providers=["sdpa_math"], timing=BOTH,
                      exclude=[{"provider": ["flex+graph", "sdpa_math+graph"]}])
    assert invoke("validate", fine).exit_code == 0


def test_providers_flag_naming_graph_rows_says_where_they_come_from(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, timing=BOTH)
    result = invoke("run", spec, "--out", tmp_path / "out", "--providers", "sdpa_math+graph")
    _refused(result, "--providers: unknown sdpa_math+graph", "timing.cuda_graph: [false, true]",
             "name the provider")


def _retyped(run_dir: Path, dtype: str) -> Path:
    def update(rows: list[dict[str, str]]) -> bool:
        for row in rows:
            row["dtype"] = dtype
        return True

    rewrite_results(run_dir / "results.csv", update)
    return run_dir


def test_gate_of_an_fp8_run_against_a_bf16_one_names_the_dtypes(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, dtype="bf16")
    bf16 = run_to_end(spec, tmp_path / "bf16")
    fp8 = _retyped(run_to_end(spec, tmp_path / "fp8"), "float8_e4m3fn")
    result = invoke("gate", fp8, "--baseline", bf16, "--metric", "ms")
    _refused(result, "no rows in common", "dtype ['float8_e4m3fn'] vs ['bfloat16']")


def test_gate_refuses_against_a_graph_row_name(tmp_path: Path) -> None:
    run_dir = run_to_end(write_spec(tmp_path, timing=BOTH), tmp_path / "out")
    result = invoke("gate", run_dir, "--baseline", run_dir, "--against", "sdpa_math+graph")
    _refused(result, "--against sdpa_math+graph: name the provider, sdpa_math")


def test_merge_of_a_run_without_setup_ms_names_the_columns(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, seqlen=[32, 64])
    first = run_to_end(spec, tmp_path / "one", "--shard", "1/2")
    second = run_to_end(spec, tmp_path / "two", "--shard", "2/2")
    csv = first / "results.csv"  # as a version before setup_ms wrote it
    lines = csv.read_text().splitlines()
    assert lines[0].endswith(",setup_ms")
    csv.write_text("".join(line.rsplit(",", 1)[0] + "\n" for line in lines))
    result = invoke("merge", first, second, "--out", tmp_path / "merged")
    _refused(result, "other results.csv columns", "with setup_ms besides", "--force")
    forced = invoke("merge", first, second, "--out", tmp_path / "merged", "--force")
    assert forced.exit_code == 0, forced.output
