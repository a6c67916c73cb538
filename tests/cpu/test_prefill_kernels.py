"""The many-row products (cpu_prefill.cpp) against plain float references, on AMX and on the
vector kernels (AVX-512 VNNI or AVX2).

Every product runs twice: with the AMX-INT8 tiles (where this CPU has them) and with them turned
off, which is the path a CPU without AMX takes. Both quantize the activations to int8 the same
way and compute the same integer dot products per group, so they agree to float rounding; both
are checked against the dequantized weights in float32.
"""

import pytest
import torch
import torch.nn.functional as F

from glmcode.engine.cpu import kernels as cpu_kernels
from glmcode.engine.quant import experts as quant_experts
from glmcode.engine.quant.formats import dequantize, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="needs our CPU kernels")

PATHS = ["amx", "vector"]


@pytest.fixture(params=PATHS)
def path(request):
    """The product path under test: AMX tiles, or the vector kernels with AMX turned off."""
    if request.param == "amx" and not cpu_kernels.amx_available():
        pytest.skip("this CPU has no AMX-INT8 (or the kernel does not grant it)")
    with cpu_kernels.amx_products(request.param == "amx"):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected).norm() / expected.norm()).item()


def on_both_paths(fn):
    """fn() with AMX on and off (the same as fn() twice where the CPU has no AMX)."""
    results = []
    for enabled in (True, False):
        with cpu_kernels.amx_products(enabled):
            results.append(fn())
    return results


# int8 activations cost ~0.7% of the output norm against float32 inputs.
ACTIVATION_ERROR = 0.012

# rows: 8 (the fewest AMX takes), 16, 37 (a partial 16-row block and a partial 32-row pass), 100
# outputs: 48 (three tiles: a panel of one), 96; inputs: 128 and 256 (one and two 64-input steps
# per group), 640
SHAPES = [(8, 128, 48), (16, 256, 96), (37, 256, 48), (100, 640, 96)]


@pytest.mark.parametrize("rows, inputs, outputs", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [64, 128])
def test_int4_product_matches_the_dequantized_weights(path, rows, inputs, outputs, dtype, group):
    q = quantize_int4(torch.randn(outputs, inputs), group)
    packed = cpu_kernels.pack_int4(q.nibbles, q.scales, q.zeros)
    x = torch.randn(rows, inputs).to(dtype)
    y = cpu_kernels.int4_linear(x, *packed, group)
    assert y.shape == (rows, outputs) and y.dtype == dtype
    assert relative_error(y, x.float() @ dequantize_int4(q).T) < ACTIVATION_ERROR + (0.01 if dtype == torch.bfloat16 else 0)


@pytest.mark.parametrize("rows, inputs, outputs", SHAPES + [(20, 192, 64)])  # 192 inputs: groups of 64
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_product_matches_the_dequantized_weights(path, rows, inputs, outputs, dtype):
    q = quantize_int8(torch.randn(outputs, inputs))
    group = cpu_kernels.activation_group(inputs)
    packed = cpu_kernels.pack_int8(q.values, q.scales, group)
    x = torch.randn(rows, inputs).to(dtype)
    y = cpu_kernels.int8_linear(x, *packed, group)
    assert y.shape == (rows, outputs) and y.dtype == dtype
    assert relative_error(y, x.float() @ dequantize_int8(q).T) < ACTIVATION_ERROR + (0.01 if dtype == torch.bfloat16 else 0)


@pytest.mark.parametrize("rows", [9, 32])
def test_per_head_int8_products_match_each_head(path, rows):
    """MLA's absorbed halves: one weight per head, heads' rows one after another."""
    heads, inputs, outputs = 3, 192, 80  # 80 outputs: five tiles; 192 inputs: groups of 64
    weights = [quantize_int8(torch.randn(outputs, inputs)) for _ in range(heads)]
    group = cpu_kernels.activation_group(inputs)
    packs = [cpu_kernels.pack_int8(w.values, w.scales, group) for w in weights]
    packed, scales, sums = (torch.stack([p[i] for p in packs]) for i in range(3))
    x = torch.randn(heads, rows, inputs)
    y = cpu_kernels.ops().int8_linear_heads(x, packed, scales, sums, group)
    assert y.shape == (heads, rows, outputs)
    for h, w in enumerate(weights):
        assert relative_error(y[h], x[h] @ dequantize_int8(w).T) < ACTIVATION_ERROR


def test_amx_and_vector_agree_to_float_rounding():
    """Same int8 activations, same integer dot product per group: only the float sums differ."""
    q4, q8 = quantize_int4(torch.randn(96, 512), 128), quantize_int8(torch.randn(96, 512))
    packed4 = cpu_kernels.pack_int4(q4.nibbles, q4.scales, q4.zeros)
    packed8 = cpu_kernels.pack_int8(q8.values, q8.scales, 128)
    x = torch.randn(70, 512)
    for product in (lambda: cpu_kernels.int4_linear(x, *packed4, 128), lambda: cpu_kernels.int8_linear(x, *packed8, 128)):
        amx, vector = on_both_paths(product)
        torch.testing.assert_close(amx, vector, rtol=1e-5, atol=1e-5 * vector.abs().max().item())


def test_few_rows_take_the_matrix_vector_kernels():
    """Under 8 rows AMX is not used: the result is the same whether it is on or not."""
    q = quantize_int4(torch.randn(64, 256), 128)
    packed = cpu_kernels.pack_int4(q.nibbles, q.scales, q.zeros)
    for rows in range(1, 8):
        x = torch.randn(rows, 256)
        amx, vector = on_both_paths(lambda: cpu_kernels.int4_linear(x, *packed, 128))
        assert torch.equal(amx, vector)


def test_groups_of_32_fall_back_to_vector_with_amx_on():
    """AMX takes whole 64-input steps per group; smaller groups stay on the vector kernels."""
    q = quantize_int4(torch.randn(32, 96), 32)
    packed = cpu_kernels.pack_int4(q.nibbles, q.scales, q.zeros)
    x = torch.randn(20, 96)
    amx, vector = on_both_paths(lambda: cpu_kernels.int4_linear(x, *packed, 32))
    assert torch.equal(amx, vector)
    assert relative_error(amx, x @ dequantize_int4(q).T) < ACTIVATION_ERROR


def float_experts(x, ids, weights, gate_up, down):
    """The MoE's routed experts in float32 from dequantized weights, token by token."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = ids[t, slot].item()
            gate, up = (x[t] @ gate_up[e].T).chunk(2)
            out[t] += weights[t, slot] * ((F.silu(gate) * up) @ down[e].T)
    return out


def make_experts(num_experts, hidden, inter):
    gate_up = [quantize_int4(torch.randn(2 * inter, hidden) / hidden**0.5, 128) for _ in range(num_experts)]
    down = [quantize_int4(torch.randn(hidden, inter) / inter**0.5, 128) for _ in range(num_experts)]
    return gate_up, down, quant_experts.StackedInt4Experts(gate_up, down, dtype=torch.float32)


@pytest.mark.parametrize("tokens", [2, 21, 90])
def test_grouped_experts_match_the_float_experts(path, tokens):
    """Tokens grouped by expert: some experts get none, some one, some several blocks of rows."""
    gate_up, down, experts = make_experts(num_experts=8, hidden=256, inter=128)
    x = torch.randn(tokens, 256)
    ids = torch.stack([torch.randperm(8)[:3] for _ in range(tokens)])
    ids[: tokens // 2, 0] = 5  # one popular expert
    weights = torch.rand(tokens, 3)
    got = experts(x, ids, weights)
    expected = float_experts(x, ids, weights, [dequantize(w) for w in gate_up], [dequantize(w) for w in down])
    assert got.shape == x.shape
    assert relative_error(got, expected) < 2.5 * ACTIVATION_ERROR  # two products in a row


def test_grouped_experts_match_one_token_at_a_time():
    """The chunk path (grouped, AMX or vector) against the decode path's per-token kernel."""
    _, _, experts = make_experts(num_experts=6, hidden=256, inter=128)
    x = torch.randn(40, 256)
    ids = torch.stack([torch.randperm(6)[:2] for _ in range(40)])
    weights = torch.rand(40, 2)
    one_by_one = torch.cat([experts(x[t : t + 1], ids[t : t + 1], weights[t : t + 1]) for t in range(40)])
    for grouped in on_both_paths(lambda: experts(x, ids, weights)):
        torch.testing.assert_close(grouped, one_by_one, rtol=1e-4, atol=1e-4 * one_by_one.abs().max().item())


def test_grouped_experts_in_bfloat16():
    gate_up, down, _ = make_experts(num_experts=4, hidden=256, inter=128)
    experts = quant_experts.StackedInt4Experts(gate_up, down, dtype=torch.bfloat16)
    x = torch.randn(33, 256)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(33)])
    weights = torch.rand(33, 2)
    expected = float_experts(x, ids, weights, [dequantize(w) for w in gate_up], [dequantize(w) for w in down])
    for got in on_both_paths(lambda: experts(x.to(torch.bfloat16), ids, weights)):
        assert got.dtype == torch.bfloat16
        assert relative_error(got, expected) < 0.05


def test_grouped_experts_reject_bad_ids():
    _, _, experts = make_experts(num_experts=4, hidden=256, inter=128)
    with pytest.raises(RuntimeError, match="expert id out of range"):
        experts(torch.randn(3, 256), torch.tensor([[0, 4], [1, 2], [3, 0]]), torch.rand(3, 2))

