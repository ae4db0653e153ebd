"""Bad input raises a clear ValueError/TypeError before any kernel is launched."""

import os
import subprocess
import sys

import pytest
import torch

from kernels import LaunchConfig, SparseAttention, sparse_attention
from tests.kernels.cases import make_layout, make_qkv


@pytest.fixture
def problem(device):
    layout = make_layout("hetero", 4, 2, 128, 32)
    q, k, v = make_qkv(1, 128, 128, 4, 2, 32, torch.float32, device)
    return layout, q, k, v


def test_wrong_rank(problem):
    layout, q, k, v = problem
    with pytest.raises(ValueError, match="q must be 4-D"):
        sparse_attention(q[0], k, v, layout)


def test_heads_not_divisible(problem, device):
    layout, q, _, _ = problem
    _, k, v = make_qkv(1, 128, 128, 4, 3, 32, torch.float32, device)
    with pytest.raises(ValueError, match=r"multiple of the number of kv heads \(3\)"):
        sparse_attention(q, k, v, layout)


def test_mismatched_shapes(problem, device):
    layout, q, k, v = problem
    with pytest.raises(ValueError, match="k and v must have one shape"):
        sparse_attention(q, k, v[:, :64], layout)
    with pytest.raises(ValueError, match="one head_dim"):
        sparse_attention(q, k[..., :16].contiguous(), v[..., :16].contiguous(), layout)
    with pytest.raises(ValueError, match="one batch size"):
        sparse_attention(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), layout)


def test_head_dim_out_of_range(device):
    layout = make_layout("hetero", 2, 2, 64, 32)
    q, k, v = make_qkv(1, 64, 64, 2, 2, 8, torch.float32, device)
    with pytest.raises(ValueError, match=r"head_dim must be in \[16, 256\]"):
        sparse_attention(q, k, v, layout)


def test_mixed_and_unsupported_dtypes(problem):
    layout, q, k, v = problem
    with pytest.raises(TypeError, match="share a dtype"):
        sparse_attention(q, k.half(), v.half(), layout)
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        sparse_attention(q.double(), k.double(), v.double(), layout)


def test_layout_heads_must_fit(problem, device):
    _, q, k, v = problem
    with pytest.raises(ValueError, match="3 pattern heads"):
        sparse_attention(q, k, v, make_layout("random", 3, 3, 128, 32))


def test_sequence_longer_than_pattern(device):
    layout = make_layout("hetero", 2, 2, 64, 32)
    q, k, v = make_qkv(1, 96, 96, 2, 2, 32, torch.float32, device)
    with pytest.raises(ValueError, match="too few for key length 96"):
        sparse_attention(q, k, v, layout)


def test_bad_seq_dim_and_scale(problem):
    layout, q, k, v = problem
    with pytest.raises(ValueError, match="seq_dim"):
        sparse_attention(q, k, v, layout, seq_dim=3)
    with pytest.raises(ValueError, match="sm_scale"):
        sparse_attention(q, k, v, layout, sm_scale=-1.0)


def test_bad_launch_config(problem):
    layout, q, k, v = problem
    with pytest.raises(ValueError, match="block_n=64 must not exceed the sparse block size 32"):
        sparse_attention(q, k, v, layout, config=LaunchConfig(32, 64, 4, 1))
    with pytest.raises(ValueError, match="block_m=48 must be a power of two"):
        sparse_attention(q, k, v, layout, config=LaunchConfig(48, 32, 4, 1))


def test_module_rejects_bad_pattern():
    p = torch.ones(2, 4, 4, dtype=torch.bool).tril()
    p[0, 1, 1] = False
    with pytest.raises(ValueError, match="diagonal"):
        SparseAttention(16, p)
    with pytest.raises(ValueError, match="block_size"):
        SparseAttention(12, torch.ones(1, 4, 4, dtype=torch.bool).tril())


def test_cpu_tensors_without_interpreter_raise():
    # A fresh interpreter without TRITON_INTERPRET: CPU tensors must give a clear error.
    code = (
        "import torch\n"
        "from kernels import sparse_attention, local_stride_layout\n"
        "l = local_stride_layout(2, 64, 32, 1, 2)\n"
        "q = torch.randn(1, 64, 2, 32)\n"
        "try:\n"
        "    sparse_attention(q, q, q, l)\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert "ValueError: q, k and v are CPU tensors" in res.stdout, res.stdout + res.stderr
