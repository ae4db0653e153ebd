"""The tuned configs shipped in the package are readable and valid for their keys."""

from pathlib import Path

from kernels.config_cache import CacheKey, load_shipped
from kernels.configs import LaunchConfig, config_problems

TUNED = Path(__file__).resolve().parents[2] / "kernels" / "tuned"


def test_shipped_files_load_and_configs_fit_their_keys():
    files = sorted(TUNED.glob("*.json"))
    assert files, "no shipped tuned configs"
    for file in files:
        entries = load_shipped(file)
        assert entries, f"{file.name} holds no entries"
        for key_str, entry in entries.items():
            key = CacheKey.from_dict(entry["key"])
            assert key.as_str() == key_str
            config = LaunchConfig.from_dict(entry["config"])
            assert not config_problems(config, key.block_size, key.head_dim, key.kernel), key_str
            assert entry["ms"] <= entry["default_ms"] * 1.001, key_str  # a winner never loses
