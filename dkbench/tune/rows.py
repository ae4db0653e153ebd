"""tune.csv: one `TuneRow` per candidate config (measured, screened out, failed or pruned),
appended per kernel."""

from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path

from kernels import LaunchConfig

from ..errors import ResultsWriteError
from ..results.schema import ResultRow
from ..spec.sweep import Case

TUNE_FILE = "tune.csv"
# The status of a candidate that the screen (`tune.screen`) timed and left out of the final: its
# ms and speedups are the screen's.
SCREENED = "screened"


@dataclass
class TuneRow:
    """One measured (or pruned, or failed) config. Field order is tune.csv's column order."""

    run_id: str
    case_id: str
    kernel: str
    dtype: str
    seqlen: int
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    pattern: str
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    impl: str = "triton"
    ms: float = float("nan")
    ms_p20: float = float("nan")
    ms_p80: float = float("nan")
    status: str = "ok"
    message: str = ""
    is_best: bool = False
    speedup_vs_default: float = float("nan")
    # The p20/p80 of the per-round speedups when timed interleaved with the default, else NaN.
    speedup_p20: float = float("nan")
    speedup_p80: float = float("nan")
    # The median per-round speedup over the default in the screen, finalists' too (so the final
    # shows how well the screen ranked); NaN where no screen timed the candidate.
    screen_speedup: float = float("nan")

    @property
    def config(self) -> LaunchConfig:
        return LaunchConfig(self.block_m, self.block_n, self.num_warps, self.num_stages,
                            self.impl)


TUNE_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(TuneRow))


def tune_row(run_id: str, case: Case, kernel: str, config: LaunchConfig) -> TuneRow:
    """The row of one config of ``kernel`` on ``case`` (the case as tuned), not yet measured."""
    return TuneRow(run_id=run_id, case_id=case.case_id, kernel=kernel, dtype=case.dtype,
                   seqlen=case.seqlen, heads=case.heads, kv_heads=case.kv_heads,
                   head_dim=case.head_dim, block_size=case.block_size,
                   pattern=case.pattern.label(), block_m=config.block_m, block_n=config.block_n,
                   num_warps=config.num_warps, num_stages=config.num_stages, impl=config.impl)


def take_measurement(row: TuneRow, measured: ResultRow) -> None:
    """Copy what the runner measured of the config into its row: outcome, times, and the speedup
    over the default (the runner's baseline)."""
    row.status, row.message = measured.status, measured.message
    row.ms, row.ms_p20, row.ms_p80 = measured.ms, measured.ms_p20, measured.ms_p80
    row.speedup_vs_default = measured.speedup
    row.speedup_p20, row.speedup_p80 = measured.speedup_p20, measured.speedup_p80


def append_tune_rows(path: Path, rows: list[TuneRow]) -> None:
    """Append rows to tune.csv (header first when new), flushed: a crash keeps finished groups.
    ResultsWriteError names the file when it cannot be written (disk full, read-only)."""
    try:
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=TUNE_COLUMNS)
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow(dataclasses.asdict(row))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise ResultsWriteError(f"cannot write {path}: {e.strerror or e}; the winners of the "
                                "kernels tuned before it are in the cache") from None
