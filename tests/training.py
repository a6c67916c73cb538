"""Brief training of tiny checkpoints with transformers (a test-only dependency), written back in the
real checkpoint layout: a model with confident predictions (quantization tests) or one that has
learned fixed answers (the server's tool-call tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def train_tiny_checkpoint(src: Path, dst: Path, *, steps: int = 40, seed: int = 0) -> Path:
    """Briefly train a tiny checkpoint on the tokenizer's text and write it in the real layout.

    Random weights make a chaotic network: every perturbation, however small, flips expert
    choices downstream, so agreement under quantization says little. A few steps of training
    give it the confident predictions real models have.
    """
    from tokenizers import Tokenizer

    from tests.conftest import load_tiny_checkpoint_writer

    model = _trainable(src, seed)
    ids = torch.tensor(Tokenizer.from_file(str(src / "tokenizer.json")).encode(load_tiny_checkpoint_writer().TRAINING_TEXT).ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (4,))
        batch = torch.stack([ids[s : s + 65] for s in starts])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return _save(model, src, dst)


def teach_answers(src: Path, dst: Path, examples: list[tuple[list[int], list[int]]], *, max_steps: int = 300,
                  seed: int = 0) -> Path:  # fmt: skip
    """Train a tiny checkpoint until each prompt's greedy continuation is its answer.

    examples: (prompt ids, answer ids) pairs; only the answers are learned (the loss is masked
    over the prompts). A few dozen steps make a 2-layer model reproduce them exactly.
    """
    model = _trainable(src, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = [(torch.tensor([prompt + answer]), torch.tensor([[-100] * len(prompt) + answer])) for prompt, answer in examples]
    for step in range(max_steps):
        loss = sum(model(ids, labels=labels).loss for ids, labels in batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9 and _answers_greedily(model, examples):
            return _save(model, src, dst)
    pytest.fail(f"the tiny model did not learn its answers in {max_steps} steps (loss {loss.item():.3f})")


@torch.no_grad()
def _answers_greedily(model, examples: list[tuple[list[int], list[int]]]) -> bool:
    """Teacher-forced: every answer token is the argmax after the tokens before it."""
    model.eval()
    try:
        for prompt, answer in examples:
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
            if logits.argmax(-1).tolist() != answer:
                return False
        return True
    finally:
        model.train()


def _trainable(src: Path, seed: int):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    return transformers.Glm4MoeLiteForCausalLM.from_pretrained(src, dtype=torch.float32).train()


def _save(model, src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy(path, dst / path.name)
    save_file(_real_layout(model.state_dict()), str(dst / "model.safetensors"))
    return dst


def _real_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused expert tensors back to the checkpoint's per-expert names."""
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        if name.endswith("experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            for e, (gate, up) in enumerate(t.chunk(2) for t in tensor):
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate.contiguous(), up.contiguous()
        elif name.endswith("experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            out |= {f"{prefix}{e}.down_proj.weight": t.contiguous() for e, t in enumerate(tensor)}
        else:
            out[name] = tensor.contiguous()
    return out
