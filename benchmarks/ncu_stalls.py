"""Where a kernel's warps wait, from Nsight Compute's per-instruction warp-state samples.

Reads the source page of an `ncu` report exported as CSV, one row per SASS instruction with its
execution count and its samples per stall reason, and prints a ledger: the stall reasons' shares
of all samples; the instructions grouped by how often they ran (one group is one loop body or one
piece of per-item code: a steady step loop's instructions all run equally often), each group's
share and top reasons; the opcodes of the hottest group; and the single hottest instructions.

    ncu --set full --import-source yes --clock-control none -k regex:NAME --launch-count 1 \\
        -o REPORT python my_script.py
    ncu -i REPORT.ncu-rep --page source --csv --print-source sass > SOURCE.csv
    python benchmarks/ncu_stalls.py SOURCE.csv [--top 12] [--json]

`kernels/PERF.md` (H200 session 11) reads the fp8 forward's profile this way. Exit status 2 when
the file is not such an export.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
STALL_PREFIX = "stall_"
NOT_ISSUED = "(Not Issued)"


@dataclass(frozen=True)
class Instruction:
    """One SASS instruction of the source page."""

    address: str
    sass: str
    executed: int
    samples: float
    stalls: dict[str, float] = field(hash=False)

    @property
    def opcode(self) -> str:
        """The opcode without its modifiers or predicate: ``@!P0 BRA 0x..`` -> ``BRA``."""
        words = self.sass.split()
        if not words:
            return "?"
        word = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
        return word.split(".")[0]


def _number(text: str) -> float:
    text = text.strip().replace(",", "")
    return float(text) if text not in ("", "-") else 0.0


def read_source_page(path: Path) -> dict[str, list[Instruction]]:
    """Each kernel's instructions, by kernel name, from an ``ncu --page source --csv`` export."""
    kernels: dict[str, list[Instruction]] = {}
    name, header = None, None
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                name, header = (row[1] if len(row) > 1 else "?"), None
                kernels.setdefault(name, [])
                continue
            if header is None:
                if name is None or "Source" not in row:
                    break
                header = {column: i for i, column in enumerate(row)}
                missing = [c for c in ("Address", "Source", SAMPLES, EXECUTED) if c not in header]
                if missing:
                    raise ValueError(f"{path}: the source page has no column {missing[0]!r}; "
                                     "export it with --page source --csv --print-source sass "
                                     "from a report collected with source counters")
                reasons = [c for c in header if c.startswith(STALL_PREFIX) and NOT_ISSUED not in c]
                continue
            cell = (lambda column: row[header[column]] if header[column] < len(row) else "")
            kernels[name].append(Instruction(
                cell("Address"), cell("Source").strip(), int(_number(cell(EXECUTED))),
                _number(cell(SAMPLES)),
                {reason[len(STALL_PREFIX):]: _number(cell(reason)) for reason in reasons}))
    if not any(kernels.values()):
        raise ValueError(f"{path}: no instructions found; expected the CSV of `ncu -i REPORT "
                         "--page source --csv --print-source sass` (a 'Kernel Name' row, then a "
                         "header with Address, Source and the warp-state sample columns)")
    return kernels


def _share(part: float, whole: float) -> float:
    return round(100 * part / whole, 2) if whole else 0.0


def _top_reasons(stalls: Counter, total: float, n: int) -> dict[str, float]:
    return {reason: _share(count, total) for reason, count in stalls.most_common(n) if count}


def ledger(instructions: list[Instruction], top: int = 12) -> dict:
    """The shares (percent of all samples) by stall reason, by execution-count group, by opcode
    of the hottest group, and of the ``top`` hottest instructions."""
    total = sum(i.samples for i in instructions)
    reasons: Counter = Counter()
    groups: dict[int, list[Instruction]] = defaultdict(list)
    for i in instructions:
        reasons.update(i.stalls)
        groups[i.executed].append(i)
    by_group = []
    for executed, members in sorted(groups.items(), key=lambda kv: -sum(i.samples for i in kv[1])):
        stalls: Counter = Counter()
        for i in members:
            stalls.update(i.stalls)
        by_group.append({"executed": executed, "instructions": len(members),
                         "share": _share(sum(i.samples for i in members), total),
                         "reasons": _top_reasons(stalls, total, 6)})
    hottest = groups[by_group[0]["executed"]] if by_group else []
    opcodes: dict[str, dict] = {}
    for i in hottest:
        entry = opcodes.setdefault(i.opcode, {"count": 0, "samples": 0.0, "stalls": Counter()})
        entry["count"] += 1
        entry["samples"] += i.samples
        entry["stalls"].update(i.stalls)
    return {
        "instructions": len(instructions),
        "samples": total,
        "reasons": _top_reasons(reasons, total, len(reasons)),
        "groups": by_group[:top],
        "hottest_group_opcodes": [
            {"opcode": op, "count": e["count"], "share": _share(e["samples"], total),
             "reasons": _top_reasons(e["stalls"], total, 3)}
            for op, e in sorted(opcodes.items(), key=lambda kv: -kv[1]["samples"])][:top],
        "hottest_instructions": [
            {"address": i.address, "sass": i.sass, "executed": i.executed,
             "share": _share(i.samples, total),
             "reasons": _top_reasons(Counter(i.stalls), total, 2)}
            for i in sorted(instructions, key=lambda i: -i.samples)[:top]],
    }


def _reasons_text(reasons: dict[str, float]) -> str:
    return ", ".join(f"{reason} {share}%" for reason, share in reasons.items())


def render(name: str, book: dict) -> str:
    """The ledger as text."""
    lines = [f"{name}: {book['instructions']} instructions, {book['samples']:.0f} samples",
             "stall reasons: " + _reasons_text(book["reasons"]),
             "by execution count (one group is one loop body or one piece of per-item code):"]
    lines += [f"  ran {g['executed']:>10}x  {g['instructions']:5d} instructions  "
              f"{g['share']:6.2f}%  {_reasons_text(g['reasons'])}" for g in book["groups"]]
    lines.append("opcodes of the hottest group:")
    lines += [f"  {o['opcode']:<12} {o['count']:5d}  {o['share']:6.2f}%  "
              f"{_reasons_text(o['reasons'])}" for o in book["hottest_group_opcodes"]]
    lines.append("hottest instructions:")
    lines += [f"  {i['address']}  {i['share']:6.2f}%  ran {i['executed']}x  {i['sass'][:60]}  "
              f"{_reasons_text(i['reasons'])}" for i in book["hottest_instructions"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source_csv", type=Path, help="ncu's source page, exported as CSV")
    parser.add_argument("--top", type=int, default=12, help="rows per table (default 12)")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be at least 1, got {args.top}")
    try:
        kernels = read_source_page(args.source_csv)
    except (OSError, ValueError) as e:
        print(f"ncu_stalls.py: {e}", file=sys.stderr)
        return 2
    for name, instructions in kernels.items():
        if not instructions:
            continue
        book = ledger(instructions, args.top)
        print(json.dumps({"kernel": name, **book}) if args.json else render(name, book))
    return 0


if __name__ == "__main__":
    sys.exit(main())
