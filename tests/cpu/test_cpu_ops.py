"""The model's elementwise ops and the attention softmax on our CPU kernels (cpu_ops.cpp,
cpu_softmax.cpp) against their PyTorch references in engine/ops.py, which the model runs wherever
the extension (or that op in its form) is not available."""

import pytest
import torch

from glmcode.engine import ops
from glmcode.engine.cpu import kernels as cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="needs our CPU kernels")

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def kernel(name: str):
    if not cpu_kernels.has_op(name):
        pytest.skip(f"this form of our CPU kernels ({cpu_kernels.build()}) has no {name}")
    return getattr(cpu_kernels.ops(), name)


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """float32: to rounding; bfloat16: at most one unit in the last place apart, rarely."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
        return
    torch.testing.assert_close(got.float(), expected.float(), rtol=8e-3, atol=1e-5)
    assert (got != expected).float().mean() < 0.01, "more than 1% of the values round differently"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", ["same", torch.float32])
@pytest.mark.parametrize("shape", [(1, 64), (37, 2048), (3, 5, 512), (2, 4), (3, 40)])
def test_rms_norm_and_add_rms_norm(shape, dtype, weight_dtype):
    x = (torch.randn(shape) * 3).to(dtype)
    residual = torch.randn(shape).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1])).to(dtype if weight_dtype == "same" else weight_dtype)
    assert_close(kernel("rms_norm")(x, weight, 1e-5), ops.rms_norm.reference(x, weight, 1e-5))
    normed, summed = kernel("add_rms_norm")(x, residual, weight, 1e-6)
    expected_normed, expected_summed = ops.add_rms_norm.reference(x, residual, weight, 1e-6)
    assert torch.equal(summed, expected_summed)
    assert_close(normed, expected_normed)
    assert normed.shape == summed.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 48), (33, 2 * 1536), (2, 3, 2 * 20)])
def test_silu_mul(shape, dtype):
    gate_up = (torch.randn(shape) * 4).to(dtype)
    got = kernel("silu_mul")(gate_up)
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    assert_close(got, ops.silu_mul.reference(gate_up))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, heads", [(1, 20), (37, 4)])
@pytest.mark.parametrize("transposed", [False, True])
def test_rope_on_the_strided_views_attention_passes(tokens, heads, dtype, transposed):
    nope, rope, latent = 16, 64, 32
    q = torch.randn(tokens, heads * (nope + rope)).to(dtype)
    kv = torch.randn(tokens, latent + rope).to(dtype)
    if transposed:  # as ops.linear returns a few rows: the transpose of a product
        q, kv = q.t().contiguous().t(), kv.t().contiguous().t()
    positions = torch.randint(0, 5000, (tokens,))
    freqs = torch.outer(torch.arange(5000).float(), 1e-2 ** (torch.arange(rope // 2) / (rope // 2)))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)

    def views(q, kv):
        return q.view(tokens, heads, -1)[..., nope:], kv[:, latent:]

    expected_q, expected_kv = q.clone(), kv.clone()
    ops.rope_.reference(*views(expected_q, expected_kv), positions, cos_sin)
    kernel("rope_")(*views(q, kv), positions, cos_sin)
    assert_close(q, expected_q)
    assert_close(kv, expected_kv)
    assert torch.equal(q.view(tokens, heads, -1)[..., :nope], expected_q.view(tokens, heads, -1)[..., :nope])


# (heads, queries, keys, first query, first key): a piece wholly before the queries, one holding
# the diagonal, one starting inside the chunk (its first rows see no key), one wholly after them
# (every row empty), and odd key counts that leave a vector tail
SOFTMAX_CASES = [(2, 5, 48, 100, 0), (3, 7, 37, 10, 8), (2, 9, 33, 20, 24), (1, 4, 20, 5, 40), (20, 16, 1638, 3000, 1638)]


@pytest.mark.parametrize("heads, queries, keys, first_query, first_key", SOFTMAX_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_softmax(heads, queries, keys, first_query, first_key, dtype):
    scores = (torch.randn(heads, queries, keys) * 4).to(dtype)
    expected = scores.clone()
    expected_mass = ops.causal_softmax_.reference(expected, first_query, first_key)
    mass = kernel("causal_softmax_")(scores, first_query, first_key)
    assert_close(scores, expected)
    torch.testing.assert_close(mass, expected_mass, rtol=1e-5, atol=1e-5)  # -inf where expected has it
    empty_rows = (first_query + torch.arange(queries)) < first_key
    assert torch.isinf(mass[:, empty_rows]).all() and (scores[:, empty_rows] == 0).all()
    assert torch.allclose(scores[:, ~empty_rows].float().sum(-1), torch.ones(()), atol=2e-2)


def test_the_ops_run_the_kernels_on_cpu_tensors():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    weight = torch.ones(64, dtype=torch.bfloat16)
    assert torch.equal(ops.rms_norm(x, weight, 1e-5), kernel("rms_norm")(x, weight, 1e-5))
    half = x.half()  # no kernel for float16: the reference runs
    assert torch.equal(ops.rms_norm(half, weight.half(), 1e-5), ops.rms_norm.reference(half, weight.half(), 1e-5))


def test_both_forms_run_the_softmax_kernel():
    assert cpu_kernels.has_op("causal_softmax_")
    assert cpu_kernels.has_op("rms_norm") == cpu_kernels.avx512_available()
    scores = torch.randn(2, 5, 40) * 4
    through_ops, direct = scores.clone(), scores.clone()
    assert torch.equal(ops.causal_softmax_(through_ops, 10, 0), kernel("causal_softmax_")(direct, 10, 0))
    assert torch.equal(through_ops, direct)
