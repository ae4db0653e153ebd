"""benchmarks/ab_fp8_forward.py off the GPU: its arguments, and the module copies it times."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("ab_fp8_forward",
                                                  ROOT / "benchmarks" / "ab_fp8_forward.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ab_fp8_forward"] = module
    spec.loader.exec_module(module)
    return module


ab = _tool()
# A revision as a source needs git and this tree's history (a source archive has neither).
needs_git = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                               reason="needs git and a checkout")


def test_a_variant_is_a_name_a_source_and_a_launch_shape() -> None:
    assert ab.parse_variant("head=HEAD~1,2,3") == ab.Variant("head", "HEAD~1", 2, 3)
    assert ab.parse_variant("mine=/tmp/v.py,1,4") == ab.Variant("mine", "/tmp/v.py", 1, 4)
    for bad, why in [("head", "NAME=SOURCE"), ("=HEAD,2,3", "NAME=SOURCE"),
                     ("head=HEAD,2", "NAME=SOURCE"), ("a b=HEAD,2,3", "NAME=SOURCE"),
                     ("head=HEAD,4,3", "BOXES must be 1 or 2"),
                     ("head=HEAD,2,5", "STAGES must be 2, 3 or 4")]:
        with pytest.raises(ValueError, match=why):
            ab.parse_variant(bad)


def test_relative_imports_are_made_absolute() -> None:
    text = ("from . import buffers\nfrom .common import LN2\nif GLUON:\n"
            "    from .fwd_ws import _read_item\nfrom kernels.layout import BlockLayout\n")
    assert ab.absolute_imports(text) == (
        "from kernels import buffers\nfrom kernels.common import LN2\nif GLUON:\n"
        "    from kernels.fwd_ws import _read_item\nfrom kernels.layout import BlockLayout\n")


@pytest.mark.parametrize("source", ["tree", pytest.param("HEAD", marks=needs_git), "file"])
def test_a_copy_of_the_module_imports_and_runs_beside_the_package(source, tmp_path) -> None:
    from kernels import fp8_ws

    if source == "file":
        source = str(tmp_path / "variant.py")
        Path(source).write_text((ROOT / "kernels" / "fp8_ws.py").read_text())
    copy = ab.load_variant(ab.Variant(f"v-{len(source)}", source, 2, 3), tmp_path)
    assert copy is not fp8_ws and copy.__file__.startswith(str(tmp_path))
    assert copy.sparse_attention_fp8_ws is not fp8_ws.sparse_attention_fp8_ws
    tile = copy._ones_tile(torch.device("cpu"), 64)  # its own cache, through its own imports
    assert torch.equal(tile.float(), torch.ones(1, 1, 8, 64)) and copy._ONES is not fp8_ws._ONES


@pytest.mark.parametrize("argv, why", [
    (["head=HEAD,3,3"], "BOXES must be 1 or 2"),
    pytest.param(["head=no-such-revision,2,3"], "neither a file, 'tree', nor a git revision",
                 marks=needs_git),
    (["a=HEAD,2,3", "a=tree,2,3"], "variant names must differ"),
    (["a=HEAD,2,3", "--seqlens", "1000"], "each must divide 65536"),
    (["a=HEAD,2,3", "--rounds", "0"], "--rounds must be at least 1"),
])
def test_bad_arguments_exit_2_saying_why(argv, why, capsys) -> None:
    assert ab.main(argv) == 2
    assert why in capsys.readouterr().err


@needs_git
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_without_a_gpu_it_says_so_and_exits_2(capsys) -> None:
    assert ab.main(["head=HEAD,2,3", "tree=tree,2,3"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
