"""Engine test helpers: tiny checkpoints of several shapes and the transformers reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import load_tiny_checkpoint_writer


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """Tiny models run many small ops; on a busy 2-core machine one thread avoids OpenMP stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# Shapes the reference checks run on: with and without q_lora, several expert counts / top-k,
# 2 to 4 layers (layer 0 is dense, the rest MoE).
CONFIGS = {
    "base": {},
    "no_q_lora": {"q_lora_rank": None, "num_hidden_layers": 2},
    "wide_moe": {"n_routed_experts": 16, "num_experts_per_tok": 4, "num_hidden_layers": 4},
    "top1_grouped": {"n_routed_experts": 6, "num_experts_per_tok": 1, "n_group": 2, "topk_group": 1},
}


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(name, **writer_args) -> Path, written once per session per name."""
    writer = load_tiny_checkpoint_writer()
    made: dict[str, Path] = {}

    def make(name: str, **kwargs) -> Path:
        if name not in made:
            made[name] = writer.make_tiny_checkpoint(tmp_path_factory.mktemp(name), **kwargs)
        return made[name]

    return make


@pytest.fixture(scope="session")
def reference_model():
    """reference_model(path) -> transformers' Glm4MoeLiteForCausalLM in float32, cached."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    loaded = {}

    def load(path: Path):
        if path not in loaded:
            model = transformers.Glm4MoeLiteForCausalLM.from_pretrained(path, dtype=torch.float32)
            loaded[path] = model.eval()
        return loaded[path]

    return load


def reference_greedy(model, prompt: list[int], num_tokens: int, num_real_tokens: int) -> list[int]:
    """Greedy continuation by the reference, re-running the full sequence at every step.

    Only real token ids compete: the padded vocabulary rows are never sampled.
    """
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1, :num_real_tokens]
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt) :]
