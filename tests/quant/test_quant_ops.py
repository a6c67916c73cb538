"""Quantized formats and modules against plain float references."""

import pytest
import torch
import torch.nn.functional as F

from glmcode.engine.cpu import kernels as cpu_kernels
from glmcode.engine.quant import experts as quant_experts
from glmcode.engine.quant import formats, latent_cache, linear
from glmcode.engine.quant.experts import QuantizedExperts
from glmcode.engine.quant.formats import (
    QuantScheme,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)
from glmcode.engine.quant.linear import Int4Linear, Int8Linear


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_int8_round_trip_error_is_within_half_a_step():
    w = torch.randn(64, 256)
    q = quantize_int8(w)
    assert q.values.dtype == torch.int8 and q.scales.shape == (64,)
    err = (dequantize_int8(q) - w).abs()
    assert (err <= q.scales[:, None] / 2 + 1e-6).all()


def test_int4_round_trip_error_is_within_half_a_step_per_group():
    w = torch.randn(32, 512) * torch.linspace(0.1, 3, 512)
    q = quantize_int4(w, 128)
    assert q.nibbles.shape == (32, 256) and q.scales.shape == (32, 4) and q.zeros.dtype == torch.bfloat16
    err = (dequantize_int4(q) - w).abs().reshape(32, 4, 128)
    step = q.scales.float()[..., None]
    # bfloat16 scale/zero rounding may push the extremes a little past half a step
    assert (err <= 0.5 * step + 0.02 * step * 16).all()
    assert err.mean() < 0.3 * step.mean()


def test_nibbles_pack_even_columns_low():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert formats.pack_nibbles(q).tolist() == [[0x21, 0x0F]]
    assert formats.unpack_nibbles(formats.pack_nibbles(q)).tolist() == q.tolist()


def test_group_size_falls_back_for_small_inputs():
    assert formats.int4_group_size(2048) == 128
    assert formats.int4_group_size(192) == 64
    assert formats.int4_group_size(96) == 32
    with pytest.raises(ValueError):
        formats.int4_group_size(40)


KERNELS = ["glmcode", "aten", "reference"]


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """Force one kernel for the quantized modules built in the test."""
    if request.param == "glmcode" and not cpu_kernels.available():
        pytest.skip("glmcode's CPU kernels are not available on this machine")
    monkeypatch.setattr(linear, "select_kernel", lambda bits, device: request.param)
    return request.param


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected).norm() / expected.norm()).item()


# int8 activations (our kernels) and bfloat16 rounding each cost well under 2% of the output norm.
_TOLERANCE = {("glmcode", torch.float32): 0.02, ("glmcode", torch.bfloat16): 0.02}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [64, 40])  # 40: not a multiple of 16, padded for the packed layouts
def test_int4_linear_matches_dequantized_reference(kernel, dtype, rows):
    q = quantize_int4(torch.randn(rows, 256), 128)
    x = torch.randn(2, 3, 256)
    layer = Int4Linear(q, dtype=dtype)
    assert layer.kernel == kernel
    expected = x.to(dtype).float() @ dequantize_int4(q).T
    got = layer(x)
    assert got.shape == (2, 3, rows) and got.dtype == torch.float32
    tolerance = _TOLERANCE.get((kernel, dtype), 1e-5 if dtype == torch.float32 else 0.01)
    assert _relative_error(got, expected) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [48, 40])
# 200: activation groups of 8 (the shortest), and rows that are not whole 16-value vectors,
# which aten's int8 matmul cannot take
@pytest.mark.parametrize("features", [384, 200])
def test_int8_linear_matches_dequantized_reference(kernel, dtype, rows, features):
    q = quantize_int8(torch.randn(rows, features))
    x = torch.randn(5, features)
    layer = Int8Linear(q, dtype=dtype)
    assert layer.kernel == ("reference" if kernel == "aten" and features % 16 else kernel)
    expected = x.to(dtype).float() @ dequantize_int8(q).T
    got = layer(x)
    assert got.shape == (5, rows)
    tolerance = _TOLERANCE.get((kernel, dtype), 1e-5 if dtype == torch.float32 else 0.01)
    assert _relative_error(got, expected) < tolerance


def test_our_kernels_handle_every_row_count():
    """Rows are processed in blocks of 4: every remainder must land in the right place."""
    if not cpu_kernels.available():
        pytest.skip("glmcode's CPU kernels are not available on this machine")
    q4, q8 = quantize_int4(torch.randn(32, 256)), quantize_int8(torch.randn(32, 256))
    layers = [Int4Linear(q4, dtype=torch.float32), Int8Linear(q8, dtype=torch.float32)]
    assert [layer.kernel for layer in layers] == ["glmcode", "glmcode"]
    for rows in range(1, 10):
        x = torch.randn(rows, 256)
        for layer, q in zip(layers, (q4, q8)):
            expected = x @ formats.dequantize(q).T
            assert _relative_error(layer(x), expected) < 0.02


@pytest.mark.parametrize("inputs, group", [(256, 128), (192, 64), (96, 32), (8192, 128)])  # 8192: runs of 32 rows
def test_many_rows_give_each_row_s_own_product_bit_for_bit(inputs, group):
    """Many rows take another loop order (runs of rows that fit L2; on AVX2, a tile's group
    unpacked once for blocks of 64 rows); the integer sums and float steps are one row's."""
    if not cpu_kernels.available():
        pytest.skip("glmcode's CPU kernels are not available on this machine")
    gen = torch.Generator().manual_seed(inputs)
    layer = Int4Linear(quantize_int4(torch.randn(48, inputs, generator=gen), group), dtype=torch.float32)
    assert layer.kernel == "glmcode"
    x = torch.randn(139, inputs, generator=gen) * 3
    with cpu_kernels.amx_products(False):
        together = layer(x)
        for rows in (8, 9, 70):
            assert torch.equal(layer(x[:rows]), together[:rows])
        alone = torch.cat([layer(x[r : r + 1]) for r in range(x.shape[0])])
    assert torch.equal(together, alone)


def test_concat_rows_equals_separate_layers():
    gate, up = torch.randn(32, 128), torch.randn(32, 128)
    fused = formats.concat_rows([quantize_int4(gate), quantize_int4(up)])
    x = torch.randn(2, 128)
    layer = Int4Linear(fused, dtype=torch.float32)
    expected = torch.cat([Int4Linear(quantize_int4(t), dtype=torch.float32)(x) for t in (gate, up)], dim=-1)
    torch.testing.assert_close(layer(x), expected)


def _float_expert(gate_up, down, x):
    g, u = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(g) * u) @ down.T


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_experts_match_the_float_moe(kernel, bits):
    num_experts, hidden, inter, top_k = 6, 128, 64, 2
    gate_up = [torch.randn(2 * inter, hidden) / hidden**0.5 for _ in range(num_experts)]
    down = [torch.randn(hidden, inter) / inter**0.5 for _ in range(num_experts)]
    q_gate_up = [formats.quantize(w, bits) for w in gate_up]
    q_down = [formats.quantize(w, bits) for w in down]
    experts = quant_experts.quantized_experts(q_gate_up, q_down, dtype=torch.float32)
    stacked = kernel == "glmcode" and bits == 4
    assert isinstance(experts, quant_experts.StackedInt4Experts if stacked else QuantizedExperts)
    x = torch.randn(7, hidden)
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(7)])
    weights = torch.rand(7, top_k)

    def moe(up_weights, down_weights):
        out = torch.zeros(7, hidden)
        for t in range(7):
            for slot in range(top_k):
                e = ids[t, slot].item()
                out[t] += weights[t, slot] * _float_expert(up_weights[e], down_weights[e], x[t])
        return out

    batched = experts(x, ids, weights)
    dequantized = moe([formats.dequantize(q) for q in q_gate_up], [formats.dequantize(q) for q in q_down])
    assert _relative_error(batched, dequantized) < (0.03 if kernel == "glmcode" else 1e-4)
    exact = moe(gate_up, down)
    # Gaussian weights are the worst case for 4 bits: ~10% error per matmul, two in a row.
    assert (batched - exact).norm() / exact.norm() < (0.03 if bits == 8 else 0.25)
    one_by_one = torch.cat([experts(x[t : t + 1], ids[t : t + 1], weights[t : t + 1]) for t in range(7)])
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=1e-4)


def test_scheme_classifies_checkpoint_tensors():
    scheme = QuantScheme.named("int4")
    bits = lambda name, shape=(64, 64): scheme.bits_for(name, shape)  # noqa: E731
    assert bits("model.layers.3.mlp.experts.7.down_proj.weight") == 4
    assert bits("model.layers.3.mlp.shared_experts.up_proj.weight") == 4
    assert bits("model.layers.3.self_attn.q_b_proj.weight") == 8
    assert bits("model.layers.0.mlp.gate_proj.weight") == 8
    assert bits("lm_head.weight") == 8
    assert bits("model.embed_tokens.weight") is None
    assert bits("model.layers.3.mlp.gate.weight") is None
    assert bits("model.layers.3.mlp.gate.e_score_correction_bias", (8,)) is None
    assert bits("model.layers.3.input_layernorm.weight", (8,)) is None
    assert QuantScheme.named("int8").bits_for("model.layers.1.mlp.experts.0.up_proj.weight", (64, 64)) == 8
    assert scheme.bits_for("model.layers.1.mlp.experts.0.down_proj.weight", (64, 48)) == 8  # 48 inputs: no int4 group
    assert QuantScheme.named("int4-all").bits_for("lm_head.weight", (64, 64)) == 4
    assert QuantScheme.named("int4-all").bits_for("model.layers.1.self_attn.kv_b_proj.weight", (64, 64)) == 8
    with pytest.raises(ValueError):
        QuantScheme.named("int3")


def test_latent_quantization_keeps_each_part_on_its_own_scale():
    latent = torch.cat([torch.randn(10, 512) * 0.05, torch.randn(10, 64) * 20], dim=-1)
    values, scales = latent_cache.quantize_latent(latent, split=512)
    assert values.dtype == torch.int8 and scales.shape == (10, 2)
    back = latent_cache.dequantize_latent(values, scales, split=512)
    assert ((back - latent).abs()[:, :512] <= scales[:, :1] / 2 + 1e-7).all()
    assert ((back - latent).abs()[:, 512:] <= scales[:, 1:] / 2 + 1e-6).all()


@pytest.mark.skipif(not cpu_kernels.available(), reason="glmcode's CPU kernels are not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_dequantize_gives_back_each_row_times_its_scale(dtype):
    """The kernel layout back to rows, per head: value times scale in float32, rounded once."""
    heads, rows, features = 3, 40, 96  # 40 rows: the last 16-row tile is padding
    values = torch.randint(-127, 128, (heads, rows, features), dtype=torch.int8)
    scales = torch.rand(heads, rows) + 0.01
    packs = [cpu_kernels.pack_int8(values[h], scales[h], 32) for h in range(heads)]
    packed, padded_scales = (torch.stack([p[i] for p in packs]) for i in range(2))
    got = cpu_kernels.ops().int8_dequantize(packed, padded_scales, rows, dtype)
    assert got.dtype == dtype and torch.equal(got, (values.float() * scales[..., None]).to(dtype))
    with pytest.raises(RuntimeError, match="rows at most N"):
        cpu_kernels.ops().int8_dequantize(packed, padded_scales, 49, dtype)


@pytest.mark.parametrize("rows", [1, 6])
def test_kv_b_projection_matches_the_float_halves(kernel, rows):
    """kv_b_proj's absorbed halves (int8 per head with our kernels) against float32 bmm."""
    from glmcode.engine.model.attention import KVBProjection

    heads, latent, nope, v = 3, 64, 48, 32  # v rows are not a whole number of 16-row tiles below
    with torch.device("meta"):
        empty = KVBProjection(heads, latent, nope, v - 8)
    weight = torch.randn(heads * (nope + v - 8), latent)
    module = linear.kv_b_projection(weight, empty, dtype=torch.float32, device=torch.device("cpu"))
    reference = KVBProjection(heads, latent, nope, v - 8).requires_grad_(False)
    reference.load(weight)
    q_nope, latents = torch.randn(heads, rows, nope), torch.randn(heads, rows, latent)
    tolerance = 0.02 if kernel == "glmcode" else 1e-5
    assert _relative_error(module.absorb_query(q_nope), reference.absorb_query(q_nope)) < tolerance
    assert _relative_error(module.values(latents), reference.values(latents)) < tolerance
    for got, expected in zip(module.halves(), reference.halves()):
        assert got.shape == expected.shape and _relative_error(got, expected) < tolerance
