"""An adversarial pass over the inference API (decode, paged decode, varlen, the partitions):
strided lengths are read as the lengths they show, a workspace never reuses a launch whose
inputs changed underneath it, and public helpers refuse bad arguments by name instead of
failing deep inside."""

from __future__ import annotations

import re

import pytest
import torch

from kernels import (
    decode_workspace,
    local_stride_layout,
    reference_attention,
    resolve_varlen_config,
    sparse_attention_decode,
    varlen_sequences,
)


def _decode_problem(batch: int = 2, heads: int = 4, kv_heads: int = 2, dim: int = 16,
                    max_len: int = 64):
    torch.manual_seed(0)
    layout = local_stride_layout(heads, max_len, 16, 2, 3)
    q = torch.randn(batch, heads, dim)
    k, v = (torch.randn(batch, max_len, kv_heads, dim) for _ in range(2))
    return q, k, v, layout


def _reference(q, k, v, lens: list[int], layout, sm_scale: float | None = None) -> torch.Tensor:
    rows = [reference_attention(q[b:b + 1, None], k[b:b + 1, :n], v[b:b + 1, :n], layout,
                                sm_scale=sm_scale)[0, 0] for b, n in enumerate(lens)]
    return torch.stack(rows)


def _strided_lengths() -> torch.Tensor:
    """int32 lengths [50, 20] as a column of a (2, 2) table: stride 2. Read as if contiguous,
    they would be [50, 7], both valid lengths, so a misread is a wrong answer, not a crash."""
    return torch.tensor([[50, 7], [20, 9]], dtype=torch.int32)[:, 0]


# -- decode: lengths that are a strided view -------------------------------------------------------


def test_decode_reads_strided_int32_lengths_as_they_are():
    # It used to pass the view to the kernel as is (int32 on q's device needs no conversion),
    # and the kernel read element b at offset b: the second sequence got length 7, silently.
    q, k, v, layout = _decode_problem()
    lens = _strided_lengths()
    out = sparse_attention_decode(q, k, v, lens, layout)
    torch.testing.assert_close(out.double(), _reference(q, k, v, [50, 20], layout), atol=2e-5,
                               rtol=0)


def test_a_workspace_step_refuses_strided_lengths_even_after_a_contiguous_call():
    # A graph-ready step copies nothing, so it must refuse the view; and the launch remembered
    # for contiguous lengths of the same shape must not let the view through unchecked.
    q, k, v, layout = _decode_problem()
    workspace = decode_workspace(q, 2, layout)
    lens = _strided_lengths()
    sparse_attention_decode(q, k, v, lens.contiguous(), layout, workspace=workspace)
    with pytest.raises(ValueError, match=r"with a workspace, cache_seqlens must be contiguous, "
                                         r"got stride \(2,\)"):
        sparse_attention_decode(q, k, v, lens, layout, workspace=workspace)


def test_a_workspace_step_reads_a_tensor_scale_changed_in_place():
    # The remembered launch keyed a tensor scale by identity and kept its old value.
    q, k, v, layout = _decode_problem()
    workspace = decode_workspace(q, 2, layout)
    lens, scale = torch.tensor([64, 17], dtype=torch.int32), torch.tensor(0.1)
    sparse_attention_decode(q, k, v, lens, layout, sm_scale=scale, workspace=workspace)
    scale.fill_(2.0)
    out = sparse_attention_decode(q, k, v, lens, layout, sm_scale=scale, workspace=workspace)
    torch.testing.assert_close(out.double(), _reference(q, k, v, [64, 17], layout, 2.0),
                               atol=2e-5, rtol=0)


def test_decode_workspace_refuses_groups_the_steps_refuse():
    # With num_splits given nothing built the group plan, so a workspace every step would
    # refuse was made without complaint.
    layout = local_stride_layout(32, 64, 16, 2, 3)
    with pytest.raises(ValueError, match="at most 31 query heads per kv head, got 32 heads for "
                                         "kv_heads=1"):
        decode_workspace(torch.randn(1, 32, 16), 1, layout, num_splits=1)


# -- varlen ------------------------------------------------------------------------------------


def test_varlen_sequences_refuse_rows_past_int32():
    # It failed in torch.tensor with "value cannot be converted to type int32 without overflow"
    # (a RuntimeError naming no argument).
    big = torch.tensor([0, 2**31 + 5])
    with pytest.raises(ValueError, match=re.escape(f"cu_seqlens_q ends at {2**31 + 5}, past "
                                                   f"{2**31 - 1}")):
        varlen_sequences(big, big)


@pytest.mark.parametrize("args,error,match", [
    (dict(layout="dense"), TypeError, "layout must be a BlockLayout, got str"),
    (dict(seq_k=0), ValueError, "sequence lengths must be >= 1"),
    (dict(seq_k=64.0), TypeError, "seq_k must be an int, got float"),
    (dict(seq_k=1024), ValueError, "too few for key length 1024"),
    (dict(probe=[1, 16]), TypeError, "probe must be a torch.Tensor"),
])
def test_resolve_varlen_config_refuses_bad_arguments(args, error, match):
    # They failed as "cannot create weak reference to 'str' object", a ZeroDivisionError, an
    # AttributeError, or (a pattern too short) returned a config for a call that cannot run.
    call = dict(probe=torch.empty(1, 1, 1, 16), layout=local_stride_layout(2, 64, 16, 2, 3),
                seq_k=64)
    call.update(args)
    with pytest.raises(error, match=match):
        resolve_varlen_config(**call)


# A plan's arguments, and a call each plan builds from right ones.
_RIGHT = {"group_plan": ((4, 2), lambda plan: plan.row_ptr.numel() > 0),
          "varlen_plan": ((16, 64), lambda plan: plan.tiles > 0)}


@pytest.mark.parametrize(("name", "args", "error", "words"), [
    ("group_plan", (4, 3), ValueError, "num_heads (4) must be a multiple of kv_heads (3)"),
    ("group_plan", (0, 0), ValueError, "num_heads must be >= 1, got 0"),
    ("group_plan", (4, 2.0), TypeError, "kv_heads must be an int, got float"),
    ("group_plan", (64, 2), ValueError,
     "layout has 4 pattern heads; expected 1, kv_heads=2 or num_heads=64"),
    ("varlen_plan", (0, 64), ValueError, "block_m=0 must be a power of two >= 16"),
    ("varlen_plan", (24, 64), ValueError, "block_m=24 must be a power of two >= 16"),
    ("varlen_plan", (16, 1000), ValueError, "the pattern covers 4x4 blocks of 16"),
    ("varlen_plan", (16, 0), ValueError, "sequence lengths must be >= 1"),
    ("varlen_plan", (16.0, 64), TypeError, "block_m must be an int, got float"),
])
def test_the_public_plans_refuse_bad_arguments(name, args, error, words) -> None:
    import kernels

    plan_of = getattr(kernels, name)
    layout = local_stride_layout(4, 64, 16, 2, 3)
    with pytest.raises(error, match=re.escape(words)):
        plan_of(layout, *args)
    right, built = _RIGHT[name]
    assert built(plan_of(layout, *right))  # and a right call still builds the plan


def test_compiled_callers_run_the_inference_forms_outside_their_graphs() -> None:
    # Dynamo cannot trace the kernels' launches: each entry point is a graph break, its result
    # eager's.
    from kernels import sparse_attention_padded, sparse_attention_varlen

    q, k, v, layout = _decode_problem()
    lens = torch.tensor([50, 20], dtype=torch.int32)
    decode = torch.compile(lambda q: sparse_attention_decode(q, k, v, lens, layout).sin(),
                           backend="eager")
    assert torch.equal(decode(q), sparse_attention_decode(q, k, v, lens, layout).sin())
    torch.manual_seed(1)
    qp, kp, vp = (torch.randn(2, 64, 4 if i == 0 else 2, 16) for i in range(3))
    seq_lens = torch.tensor([64, 40])
    padded = torch.compile(lambda q: sparse_attention_padded(q, kp, vp, seq_lens, layout) * 2,
                           backend="eager")
    assert torch.equal(padded(qp), sparse_attention_padded(qp, kp, vp, seq_lens, layout) * 2)
    cu = torch.tensor([0, 64, 104], dtype=torch.int32)
    qv, kv_, vv = qp.reshape(-1, 4, 16)[:104], kp.reshape(-1, 2, 16)[:104], vp.reshape(-1, 2, 16)[:104]
    varlen = torch.compile(lambda q: sparse_attention_varlen(q, kv_, vv, cu, cu, layout) + 1,
                           backend="eager")
    assert torch.equal(varlen(qv), sparse_attention_varlen(qv, kv_, vv, cu, cu, layout) + 1)
