"""Triton absorbed-MLA decode against the PyTorch reference over random paged caches."""

from __future__ import annotations

import pytest
import torch

from glmcode.engine import ops
from glmcode.engine.quant.latent_cache import FP8_E4M3_MAX, quantize_fp8_per_token

mla_decode_reference = ops.mla_decode.reference


def quantize_fp8_per_tensor(rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Cache rows -> float8_e4m3fn with one fixed scale (values / scale, saturated at 448)."""
    return (rows.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def paged_case(
    device, *, seq_lens, num_heads, latent_dim, rope_dim, block_size, dtype, seed=0, spare_blocks=3
):
    """Random queries, a random cache and random (shuffled, non-contiguous) block tables."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = max(-(-n // block_size) for n in seq_lens) + 1
    num_blocks = len(seq_lens) * blocks_per_seq + spare_blocks
    kv_cache = torch.randn(num_blocks, block_size, latent_dim + rope_dim, generator=gen)
    q_nope = torch.randn(len(seq_lens), num_heads, latent_dim, generator=gen)
    q_pe = torch.randn(len(seq_lens), num_heads, rope_dim, generator=gen)
    block_tables = torch.randperm(num_blocks, generator=gen)[: len(seq_lens) * blocks_per_seq]
    block_tables = block_tables.view(len(seq_lens), blocks_per_seq).to(torch.int32)
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    to = dict(device=device)
    return (
        q_nope.to(dtype=dtype, **to), q_pe.to(dtype=dtype, **to), kv_cache.to(dtype=dtype, **to),
        block_tables.to(**to), seq_lens.to(**to),
    )


TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_on_small_heads(triton_mla, device, block_size, num_splits, dtype):
    q_nope, q_pe, kv_cache, block_tables, seq_lens = paged_case(
        device, seq_lens=[1, 13, 37, 64], num_heads=5, latent_dim=32, rope_dim=16,
        block_size=block_size, dtype=dtype,
    )
    got = triton_mla.mla_decode(q_nope, q_pe, kv_cache, block_tables, seq_lens, 0.3, num_splits=num_splits)
    want = mla_decode_reference(q_nope, q_pe, kv_cache, block_tables, seq_lens, 0.3)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_more_splits_than_tiles_and_many_heads(triton_mla, device):
    """Splits that end up empty (short sequences) and two head blocks (40 heads > 32 rows)."""
    q_nope, q_pe, kv_cache, block_tables, seq_lens = paged_case(
        device, seq_lens=[3, 50], num_heads=40, latent_dim=16, rope_dim=16, block_size=8,
        dtype=torch.float32, seed=1,
    )
    got = triton_mla.mla_decode(q_nope, q_pe, kv_cache, block_tables, seq_lens, 0.25, num_splits=6, block_n=16)
    want = mla_decode_reference(q_nope, q_pe, kv_cache, block_tables, seq_lens, 0.25)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_many_splits_merge_in_column_blocks(triton_mla, device):
    """128 splits (the merge then reads its partials in column blocks), most of them empty for the
    short sequences; the merge must read only the splits that hold tokens."""
    q_nope, q_pe, kv_cache, block_tables, seq_lens = paged_case(
        device, seq_lens=[1, 300, 700, 1500], num_heads=5, latent_dim=128, rope_dim=16, block_size=16,
        dtype=torch.float32, seed=3,
    )
    got = triton_mla.mla_decode(q_nope, q_pe, kv_cache, block_tables, seq_lens, 0.25, num_splits=128, block_n=16)
    want = mla_decode_reference(q_nope, q_pe, kv_cache, block_tables, seq_lens, 0.25)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_real_glm_head_dims(triton_mla, device):
    """20 heads, 512 latent + 64 rope, bf16, the real 1/sqrt(256) scale; a few tokens only."""
    q_nope, q_pe, kv_cache, block_tables, seq_lens = paged_case(
        device, seq_lens=[5, 70], num_heads=20, latent_dim=512, rope_dim=64, block_size=16,
        dtype=torch.bfloat16, seed=2,
    )
    got = triton_mla.mla_decode(q_nope, q_pe, kv_cache, block_tables, seq_lens, 256**-0.5, num_splits=2)
    want = mla_decode_reference(q_nope, q_pe, kv_cache, block_tables, seq_lens, 256**-0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # in Triton's interpreter, a zero divide warns
def test_empty_sequences_give_zeros_not_nan(triton_mla, device):
    """Padded batch slots (seq_len 0, as in a CUDA-graph batch bucket) must stay finite."""
    q_nope, q_pe, kv_cache, block_tables, seq_lens = paged_case(
        device, seq_lens=[0, 9, 0], num_heads=3, latent_dim=16, rope_dim=16, block_size=4,
        dtype=torch.float32, seed=3,
    )
    for num_splits in (1, 2):
        got = triton_mla.mla_decode(q_nope, q_pe, kv_cache, block_tables, seq_lens, 0.5, num_splits=num_splits)
        assert torch.isfinite(got).all()
        assert got[0].abs().max() == 0 and got[2].abs().max() == 0
        want = mla_decode_reference(q_nope, q_pe, kv_cache, block_tables, seq_lens, 0.5)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("scaling", ["per_token", "per_tensor"])
def test_fp8_cache(triton_mla, device, scaling):
    q_nope, q_pe, kv_cache, block_tables, seq_lens = paged_case(
        device, seq_lens=[7, 40], num_heads=4, latent_dim=32, rope_dim=16, block_size=8,
        dtype=torch.float32, seed=4,
    )
    rows = kv_cache.reshape(-1, kv_cache.shape[-1])
    if scaling == "per_token":
        quantized, scales = quantize_fp8_per_token(rows)
        kv_scale = scales.view(kv_cache.shape[:2])
    else:
        kv_scale = torch.tensor([rows.abs().max().item() / 448.0], device=device)
        quantized = quantize_fp8_per_tensor(rows, kv_scale.item())
    fp8_cache = quantized.view(kv_cache.shape)
    q_nope, q_pe = q_nope.bfloat16(), q_pe.bfloat16()

    got = triton_mla.mla_decode(q_nope, q_pe, fp8_cache, block_tables, seq_lens, 0.2, kv_scale, num_splits=2)
    want = mla_decode_reference(q_nope, q_pe, fp8_cache, block_tables, seq_lens, 0.2, kv_scale)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    # and the fp8 cache stays close to the unquantized answer
    exact = mla_decode_reference(q_nope, q_pe, kv_cache, block_tables, seq_lens, 0.2)
    assert (got.float() - exact.float()).abs().max() < 0.15


def test_writes_into_given_output(triton_mla, device):
    q_nope, q_pe, kv_cache, block_tables, seq_lens = paged_case(
        device, seq_lens=[6, 11], num_heads=2, latent_dim=16, rope_dim=16, block_size=4,
        dtype=torch.float32, seed=5,
    )
    out = torch.full_like(q_nope, float("nan"))
    result = triton_mla.mla_decode(q_nope, q_pe, kv_cache, block_tables, seq_lens, 0.5, out=out, num_splits=2)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, mla_decode_reference(q_nope, q_pe, kv_cache, block_tables, seq_lens, 0.5))


def test_default_split_count_depends_only_on_shapes(triton_mla):
    cpu = torch.device("cpu")
    # off a GPU the device counts as one SM, and two programs per SM are wanted
    assert triton_mla.default_num_splits(1, 20, 256, cpu) == 1  # never splits under 256 tokens
    assert triton_mla.default_num_splits(1, 20, 131072, cpu) == 2
    assert triton_mla.default_num_splits(8, 20, 131072, cpu) == 1
    assert 1 <= triton_mla.default_num_splits(32, 20, 131072, cpu) <= triton_mla.MAX_SPLITS


def test_rejects_mismatched_cache_rows(triton_mla, device):
    q_nope, q_pe, kv_cache, block_tables, seq_lens = paged_case(
        device, seq_lens=[4], num_heads=2, latent_dim=16, rope_dim=16, block_size=4, dtype=torch.float32,
    )
    with pytest.raises(ValueError, match="kv_cache rows"):
        triton_mla.mla_decode(q_nope, q_pe[..., :8].contiguous(), kv_cache, block_tables, seq_lens, 0.5)
