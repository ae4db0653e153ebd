"""The tuned configs shipped in the package are readable and valid for their keys."""

from pathlib import Path

import torch

from kernels import select
from kernels.config_cache import CacheKey, ConfigCache, load_shipped
from kernels.configs import LaunchConfig, config_problems

TUNED = Path(__file__).resolve().parents[2] / "kernels" / "tuned"


def shipped_problems(files: list[Path]) -> list[str]:
    """Why shipped entries cannot be used as they are (empty when all can)."""
    problems = []
    for file in files:
        entries = load_shipped(file)
        if not entries:
            problems.append(f"{file.name} holds no entries")
        for key_str, entry in entries.items():
            key = CacheKey.from_dict(entry["key"])
            if key.as_str() != key_str:
                problems.append(f"{key_str}: its key reads {key.as_str()}")
            config = LaunchConfig.from_dict(entry["config"])
            for problem in config_problems(config, key.block_size, key.head_dim, key.kernel):
                problems.append(f"{key_str}: {problem}")
            if entry["ms"] > entry["default_ms"] * 1.001:  # a winner never loses
                problems.append(f"{key_str}: {entry['ms']} ms loses to the default's "
                                f"{entry['default_ms']} ms")
    return problems


def test_shipped_files_load_and_configs_fit_their_keys():
    # No file ships until the kernels are retuned (kernels/tuned/README.md); any that does
    # must pass.
    assert shipped_problems(sorted(TUNED.glob("*.json"))) == []


def test_the_shipped_check_rejects_bad_entries(tmp_path: Path) -> None:
    file = tmp_path / "h200.json"
    key = select.cache_key("decode", torch.device("cpu"), torch.bfloat16, 128, 64, 8192, 0.3)
    cache = ConfigCache(file)
    cache.put(key, LaunchConfig(16, 64, 4, 3).as_dict(), ms=1.0, default_ms=1.2)
    assert shipped_problems([file]) == []
    cache.put(key, LaunchConfig(64, 64, 4, 3).as_dict(), ms=1.5, default_ms=1.2)
    problems = shipped_problems([file])
    assert len(problems) == 2 and "block_m=64 must be 16 for decoding" in problems[0]
    assert "loses to the default" in problems[1]
