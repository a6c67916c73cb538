"""Building blocks against their definitions (and the reference's own functions)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmcode.engine import ops
from glmcode.engine.model.layers import RMSNorm, Rotary


@pytest.mark.parametrize("rows", [1, 3, 32, 33])
def test_linear_equals_f_linear_for_every_row_count(rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(48, 40, generator=generator)
    x = torch.randn(2, rows, 40, generator=generator)[:1]  # a batch dim and a non-trivial view
    out = ops.linear(x, weight)
    assert out.shape == (1, rows, 48)
    torch.testing.assert_close(out, F.linear(x, weight))


def test_interleaved_rotary_matches_the_reference():
    modeling = pytest.importorskip("transformers.models.glm4_moe_lite.modeling_glm4_moe_lite")
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(5, 3, 8, generator=generator)  # [T, heads, rope dims]
    k = torch.randn(5, 8, generator=generator)
    positions = torch.tensor([0, 1, 7, 100, 4095])
    table = Rotary(8, 10000.0, max_positions=4096).cos_sin(torch.device("cpu"))
    cos, sin = table[positions].chunk(2, dim=-1)
    # The reference takes [batch, heads, T, dim] and cos/sin duplicated over both halves.
    full_cos, full_sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
    ref_q, ref_k = modeling.apply_rotary_pos_emb_interleave(
        q.transpose(0, 1)[None], k[None, None], full_cos, full_sin
    )
    ops.rope_(q, k, positions, table)
    torch.testing.assert_close(q, ref_q[0].transpose(0, 1))
    torch.testing.assert_close(k, ref_k[0, 0])


def test_rotary_preserves_pair_norms_and_is_identity_at_position_zero():
    x = torch.randn(2, 8)
    table = Rotary(8, 1e6, max_positions=16).cos_sin(torch.device("cpu"))
    out, unused_q = x.clone(), torch.zeros(2, 1, 8)
    ops.rope_(unused_q, out, torch.tensor([0, 9]), table)
    torch.testing.assert_close(out[0], torch.cat([x[0, 0::2], x[0, 1::2]]))
    pairs_in = x[1, 0::2] ** 2 + x[1, 1::2] ** 2
    pairs_out = out[1, :4] ** 2 + out[1, 4:] ** 2
    torch.testing.assert_close(pairs_out, pairs_in)


def test_rms_norm_normalizes_in_float32_then_scales():
    norm = RMSNorm(4, eps=1e-6)
    norm.weight.data = torch.tensor([1.0, 2.0, 0.5, -1.0])
    x = torch.tensor([[3.0, -4.0, 0.0, 0.0]], dtype=torch.bfloat16)
    rms = (25 / 4) ** 0.5
    expected = torch.tensor([[3 / rms, -8 / rms, 0.0, 0.0]])
    out = norm.to(torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)
