"""The streaming quantizer and the quantized checkpoint reader, on real files."""

import json
import os

import pytest
import torch

from glmcode.engine.quant import checkpoint as quant_checkpoint
from glmcode.engine.quant.checkpoint import (
    iter_checkpoint_weights,
    quantization_config,
    quantize_checkpoint,
    verify_quantized_checkpoint,
)
from glmcode.engine.quant.formats import (
    Int4Weight,
    Int8Weight,
    QuantScheme,
    dequantize,
    quantize,
)
from glmcode.errors import CheckpointError, UsageError

from .conftest import write_checkpoint


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_checkpoint_holds_every_weight_in_the_right_format(float_checkpoint, tmp_path, bits):
    src, tensors = float_checkpoint
    dst = quantize_checkpoint(src, tmp_path / "q", bits=bits, shard_bytes=64 << 10, progress=False)
    section = quantization_config(dst)
    assert section == {"quant_method": "glmcode", "format_version": 1, "expert_bits": bits, "linear_bits": 8, "group_size": 128}
    assert json.loads((dst / "config.json").read_text())["hidden_size"] == 128
    assert (dst / "tokenizer_config.json").read_text() == '{"model_max_length": 4096}'
    assert len(list(dst.glob("model-*-of-*.safetensors"))) > 1  # small shard size: several shards
    assert not list(tmp_path.glob(".q.partial-*"))

    loaded = dict(iter_checkpoint_weights(dst))
    assert set(loaded) == set(tensors)
    scheme = QuantScheme(expert_bits=bits, linear_bits=8)
    for name, original in tensors.items():
        expected_bits = scheme.bits_for(name, tuple(original.shape))
        got = loaded[name]
        if expected_bits is None:
            assert got.dtype == original.dtype and torch.equal(got, original), name
            continue
        assert isinstance(got, Int4Weight if expected_bits == 4 else Int8Weight), name
        reference = quantize(original, expected_bits)
        torch.testing.assert_close(dequantize(got), dequantize(reference), msg=name)
    verify_quantized_checkpoint(dst, checksums=True)


def test_single_file_source_and_on_the_fly_quantization_agree(tmp_path):
    tensors = write_checkpoint(tmp_path / "single", num_shards=1)
    scheme = QuantScheme.named("int4")
    on_the_fly = dict(iter_checkpoint_weights(tmp_path / "single", scheme))
    from_disk = dict(iter_checkpoint_weights(quantize_checkpoint(tmp_path / "single", tmp_path / "q", progress=False)))
    assert set(on_the_fly) == set(from_disk) == set(tensors)
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    assert isinstance(on_the_fly[name], Int4Weight)
    torch.testing.assert_close(dequantize(on_the_fly[name]), dequantize(from_disk[name]))
    assert dict(iter_checkpoint_weights(tmp_path / "single"))[name].dtype == torch.bfloat16


def test_large_tensors_are_quantized_in_row_blocks_identically(float_checkpoint, tmp_path, monkeypatch):
    src, tensors = float_checkpoint
    monkeypatch.setattr(quant_checkpoint, "_ROWS_PER_CHUNK", 48)  # lm_head: 320 rows in 7 blocks
    dst = quantize_checkpoint(src, tmp_path / "q", bits=4, progress=False)
    lm_head = dict(iter_checkpoint_weights(dst))["lm_head.weight"]
    torch.testing.assert_close(dequantize(lm_head), dequantize(quantize(tensors["lm_head.weight"], 8)))


def test_interrupted_conversion_leaves_nothing_that_looks_complete(float_checkpoint, tmp_path, monkeypatch):
    src, _ = float_checkpoint
    calls = []

    def failing_convert(name, source, scheme):
        calls.append(name)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return original(name, source, scheme)

    original = quant_checkpoint._convert_tensor
    monkeypatch.setattr(quant_checkpoint, "_convert_tensor", failing_convert)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, tmp_path / "q", shard_bytes=16 << 10, progress=False)
    assert not (tmp_path / "q").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["float"]


def test_refuses_to_overwrite_or_requantize(float_checkpoint, tmp_path):
    src, _ = float_checkpoint
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        quantize_checkpoint(src, tmp_path / "busy", progress=False)
    dst = quantize_checkpoint(src, tmp_path / "q", progress=False)
    with pytest.raises(UsageError, match="already quantized"):
        quantize_checkpoint(dst, tmp_path / "qq", progress=False)
    with pytest.raises(UsageError, match="4 or 8"):
        quantize_checkpoint(src, tmp_path / "q3", bits=3, progress=False)


@pytest.fixture
def quantized(float_checkpoint, tmp_path):
    src, _ = float_checkpoint
    return quantize_checkpoint(src, tmp_path / "q", shard_bytes=64 << 10, progress=False)


def _first_shard(directory):
    return sorted(directory.glob("model-*.safetensors"))[0]


def test_truncated_shard_is_a_checkpoint_error(quantized):
    shard = _first_shard(quantized)
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"expected \d+ \(truncated"):
        list(iter_checkpoint_weights(quantized))


def test_missing_shard_is_a_checkpoint_error(quantized):
    _first_shard(quantized).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        list(iter_checkpoint_weights(quantized))


def test_corrupted_header_is_a_checkpoint_error(quantized):
    shard = _first_shard(quantized)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\xff" * 12
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        list(iter_checkpoint_weights(quantized))


def test_flipped_data_bytes_fail_the_checksum(quantized):
    shard = _first_shard(quantized)
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x5A
    shard.write_bytes(bytes(data))
    verify_quantized_checkpoint(quantized)  # sizes and headers are still fine
    with pytest.raises(CheckpointError, match="checksum"):
        verify_quantized_checkpoint(quantized, checksums=True)


def test_unknown_format_version_is_a_checkpoint_error(quantized):
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format version 99"):
        list(iter_checkpoint_weights(quantized))
