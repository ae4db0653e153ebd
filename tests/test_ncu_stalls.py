"""benchmarks/ncu_stalls.py: the stall ledger of an ncu source-page export, on a small export
written here in ncu's CSV shape."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ncu_stalls", ROOT / "benchmarks" / "ncu_stalls.py")
ncu_stalls = importlib.util.module_from_spec(_spec)
sys.modules["ncu_stalls"] = ncu_stalls  # its dataclass looks its module up
_spec.loader.exec_module(ncu_stalls)

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)",
          "Warp Stall Sampling (Not-issued Samples)", "Instructions Executed", "stall_wait",
          "stall_barrier", "stall_mio", "stall_wait (Not Issued)"]
# (address, sass, samples, executed, wait, barrier, mio): a loop of three instructions run 100
# times, and one run once.
ROWS = [("0x10", "      FMNMX R14, R15, R30, !PT", 30, 100, 20, 0, 10),
        ("0x20", "@!P0  BRA 0x40", 10, 100, 10, 0, 0),
        ("0x30", "      MUFU.EX2 R1, R2", 20, 100, 5, 0, 15),
        ("0x40", "      NOP", 40, 1, 0, 40, 0)]


def _export(path: Path, kernel: str = "my_kernel") -> Path:
    with path.open("w", newline="") as f:
        out = csv.writer(f, quoting=csv.QUOTE_ALL)
        out.writerow(["Kernel Name", kernel])
        out.writerow(HEADER)
        for address, sass, samples, executed, wait, barrier, mio in ROWS:
            out.writerow([address, sass, samples, samples, f"{executed:,}", wait, barrier, mio,
                          wait])
    return path


def test_ledger_shares(tmp_path):
    kernels = ncu_stalls.read_source_page(_export(tmp_path / "src.csv"))
    assert list(kernels) == ["my_kernel"]
    book = ncu_stalls.ledger(kernels["my_kernel"], top=3)
    assert book["samples"] == 100
    # Each reason's share of all samples; the "(Not Issued)" columns are not reasons of their own.
    assert book["reasons"] == {"barrier": 40.0, "wait": 35.0, "mio": 25.0}
    loop, once = book["groups"]
    assert (loop["executed"], loop["instructions"], loop["share"]) == (100, 3, 60.0)
    assert (once["executed"], once["instructions"], once["share"]) == (1, 1, 40.0)
    # The hottest group is the loop (60% of the samples), its opcodes without predicate or
    # modifiers, hottest first.
    assert [o["opcode"] for o in book["hottest_group_opcodes"]] == ["FMNMX", "MUFU", "BRA"]
    assert book["hottest_instructions"][0]["sass"] == "NOP"
    assert len(book["hottest_instructions"]) == 3


def test_cli_text_and_json(tmp_path, capsys):
    path = _export(tmp_path / "src.csv")
    assert ncu_stalls.main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "my_kernel: 4 instructions, 100 samples" in text
    assert "ran        100x      3 instructions   60.00%" in text
    assert ncu_stalls.main([str(path), "--json", "--top", "1"]) == 0
    book = json.loads(capsys.readouterr().out)
    assert book["kernel"] == "my_kernel" and len(book["groups"]) == 1


@pytest.mark.parametrize("content", ["", "a,b\n1,2\n", '"Kernel Name","k"\n"Address","Source"\n'])
def test_not_an_export_exits_2(tmp_path, capsys, content):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert ncu_stalls.main([str(path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_missing_file_exits_2(tmp_path, capsys):
    assert ncu_stalls.main([str(tmp_path / "none.csv")]) == 2
    assert "none.csv" in capsys.readouterr().err
