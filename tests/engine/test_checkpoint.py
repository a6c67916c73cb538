"""Loading checkpoints: every supported layout loads, every broken one names what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmcode.engine import LLM
from glmcode.engine.weights.layout import INDEX_FILE, SINGLE_FILE
from glmcode.errors import CheckpointError

EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


def load(path: Path, **kwargs) -> LLM:
    return LLM(path, dtype="float32", kv_cache_memory=4 << 20, progress=False, **kwargs)


@pytest.fixture(scope="module")
def reference_logits(tiny_checkpoint) -> tuple[list[int], torch.Tensor]:
    llm = load(tiny_checkpoint)
    ids = llm.tokenizer.encode("def push(self, item): return héllo")
    return ids, llm.score(ids)


@pytest.fixture
def copy(tiny_checkpoint, tmp_path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, target)
    return target


def index(path: Path) -> dict:
    return json.loads((path / INDEX_FILE).read_text())


def shard_of(path: Path, name: str) -> Path:
    return path / index(path)["weight_map"][name]


def rewrite_shard(path: Path, name: str, change) -> None:
    """Apply change(tensors) to the shard that holds `name`, and keep the index in step."""
    shard = shard_of(path, name)
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard)
    data = index(path)
    data["weight_map"] = {n: f for n, f in data["weight_map"].items() if f != shard.name}
    data["weight_map"] |= dict.fromkeys(tensors, shard.name)
    (path / INDEX_FILE).write_text(json.dumps(data))


def test_sharded_checkpoint_with_mtp_block_loads_and_skips_mtp(copy, reference_logits):
    mtp_names = [n for n in index(copy)["weight_map"] if n.startswith("model.layers.3.")]
    assert mtp_names  # the writer puts an MTP block after the 3 main layers
    ids, expected = reference_logits
    torch.testing.assert_close(load(copy).score(ids), expected)


def test_dtype_defaults_to_the_checkpoint_dtype(tiny_checkpoint, make_checkpoint):
    assert load(tiny_checkpoint).dtype == torch.float32
    bf16 = make_checkpoint("bf16", dtype=torch.bfloat16)
    llm = LLM(bf16, kv_cache_memory=1 << 20, progress=False)
    assert llm.dtype == torch.bfloat16
    assert llm.model.lm_head.weight.dtype == llm.kv_cache.data.dtype == torch.bfloat16
    router = llm.model.model.layers[1].mlp.gate
    assert router.weight.dtype == router.e_score_correction_bias.dtype == torch.float32
    assert load(bf16).model.lm_head.weight.dtype == torch.float32  # an explicit dtype wins
    assert LLM(bf16, dtype=torch.float16, kv_cache_memory=1 << 20, progress=False).dtype == torch.float16


def merge_into_single_file(path: Path) -> dict[str, torch.Tensor]:
    merged = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        merged |= load_file(shard)
        shard.unlink()
    (path / INDEX_FILE).unlink()
    return merged


def test_single_file_checkpoint_loads(copy, reference_logits):
    save_file(merge_into_single_file(copy), copy / SINGLE_FILE)
    ids, expected = reference_logits
    torch.testing.assert_close(load(copy).score(ids), expected)


def test_fused_expert_tensors_load_like_per_expert_ones(copy, reference_logits):
    """transformers can store each layer's experts as gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
    tensors = merge_into_single_file(copy)
    for layer in (1, 2):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up, down = [], []
        for e in range(8):
            gate_up.append(torch.cat([tensors.pop(f"{prefix}{e}.gate_proj.weight"),
                                      tensors.pop(f"{prefix}{e}.up_proj.weight")]))  # fmt: skip
            down.append(tensors.pop(f"{prefix}{e}.down_proj.weight"))
        tensors[prefix + "gate_up_proj"] = torch.stack(gate_up)
        tensors[prefix + "down_proj"] = torch.stack(down)
    save_file(tensors, copy / SINGLE_FILE)
    ids, expected = reference_logits
    torch.testing.assert_close(load(copy).score(ids), expected)


def test_transformers_config_form_loads(make_checkpoint, reference_logits):
    path = make_checkpoint("hf-form", config_form="transformers")
    config = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in config and "mlp_layer_types" in config and "rope_theta" not in config
    ids, expected = reference_logits
    torch.testing.assert_close(load(path).score(ids), expected)


def test_checkpoint_saved_by_transformers_loads_as_is(tiny_checkpoint, reference_model, tmp_path):
    reference = reference_model(tiny_checkpoint)
    reference.save_pretrained(tmp_path)
    shutil.copy(tiny_checkpoint / "tokenizer.json", tmp_path)
    llm = load(tmp_path)
    ids = llm.tokenizer.encode("class Stack: pass")
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(llm.score(ids), expected, atol=1e-4, rtol=0)


def test_missing_tensor_is_named(copy):
    rewrite_shard(copy, EXPERT, lambda t: t.pop(EXPERT))
    with pytest.raises(CheckpointError, match=f"missing tensor {EXPERT}"):
        load(copy)


def test_unexpected_tensor_is_named(copy):
    extra = "model.layers.1.self_attn.rotary_extra.weight"
    rewrite_shard(copy, EXPERT, lambda t: t.update({extra: torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=f"unexpected tensor {extra}"):
        load(copy)


def test_wrongly_shaped_tensor_is_named_with_both_shapes(copy):
    name = "model.layers.2.self_attn.kv_b_proj.weight"
    rewrite_shard(copy, name, lambda t: t.update({name: torch.zeros(5, 7)}))
    with pytest.raises(CheckpointError, match=rf"{name} has shape \[5, 7\], expected \[160, 32\]"):
        load(copy)


def test_truncated_shard_is_named(copy):
    shard = shard_of(copy, EXPERT)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        load(copy)


def test_index_that_is_not_json_is_reported(copy):
    (copy / INDEX_FILE).write_text("{ not json")
    with pytest.raises(CheckpointError, match=INDEX_FILE):
        load(copy)


def test_index_naming_a_missing_shard_is_reported(copy):
    shard = shard_of(copy, EXPERT)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"refers to {shard.name}, which does not exist"):
        load(copy)


def test_index_listing_a_tensor_its_shard_lacks_is_reported(copy):
    data = index(copy)
    data["weight_map"][EXPERT] = next(f for f in data["weight_map"].values() if f != shard_of(copy, EXPERT).name)
    (copy / INDEX_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"{EXPERT} is listed in the index but missing"):
        load(copy)


def test_directory_without_weights_is_reported(copy):
    for shard in copy.glob("*.safetensors"):
        shard.unlink()
    (copy / INDEX_FILE).unlink()
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load(copy)


@pytest.mark.parametrize("field", ["kv_lora_rank", "num_hidden_layers", "vocab_size"])
def test_missing_config_field_is_named(copy, field):
    config = json.loads((copy / "config.json").read_text())
    del config[field]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"required field '{field}' is missing"):
        load(copy)


def test_unsupported_model_type_is_named(copy):
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "llama"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'"):
        load(copy)


def test_missing_config_or_tokenizer_is_reported(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer"):
        load(copy)
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        load(copy)


def test_progress_bar_can_be_shown(tiny_checkpoint, capsys):
    LLM(tiny_checkpoint, kv_cache_memory=1 << 20, progress=True)
    capsys.readouterr()  # rich wrote (or skipped, off a terminal) without failing
