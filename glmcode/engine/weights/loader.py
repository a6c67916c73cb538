"""Loading a checkpoint into the model: float weights here, quantized ones through quant/loader.py.

The float model's parameters are allocated once (model.build_model); each checkpoint tensor is
read from its shard and copied into its slot (weights/names.py), so at most one tensor exists
twice at any moment. Every inconsistency is a CheckpointError naming the tensor or file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glmcode.engine.config import ModelConfig
from glmcode.engine.disk_cache import checkpoint_identity
from glmcode.engine.model import GlmMoeLite, build_model
from glmcode.engine.weights import snapshot
from glmcode.engine.weights.names import Slot, checkpoint_slots, wanted
from glmcode.engine.weights.progress import byte_progress
from glmcode.engine.weights.safetensors import checkpoint_files, open_shards
from glmcode.errors import CheckpointError


def load_model(
    model_dir: str | Path, config: ModelConfig, *, dtype: torch.dtype, device: torch.device,
    quantization: str | None = None, progress: bool = True, snapshot_dir: Path | None = None,
) -> GlmMoeLite:  # fmt: skip
    """The model with the checkpoint's weights, quantized when the checkpoint is or `quantization` asks.

    snapshot_dir: where a quantized CPU model is kept as built, so that later loads map it
    (snapshot.py); None: build it every time.
    """
    from glmcode.engine.quant.loader import is_quantized_checkpoint, load_quantized_model

    if quantization is not None or is_quantized_checkpoint(model_dir):
        def build() -> GlmMoeLite:
            return load_quantized_model(config, model_dir, dtype=dtype, device=device, quantization=quantization, progress=progress)

        if snapshot_dir is None or device.type != "cpu":
            return build()
        identity = {**checkpoint_identity(model_dir), "quantization": quantization, "dtype": str(dtype)}
        return snapshot.load_or_build(snapshot_dir, identity, build, progress=progress)
    model = build_model(config, dtype, device)
    load_checkpoint(model, model_dir, progress=progress)
    return model


def load_checkpoint(model: GlmMoeLite, model_dir: str | Path, *, progress: bool = True) -> None:
    """Fill every parameter of `model` from the checkpoint in `model_dir`."""
    files = {name: path for name, path in checkpoint_files(model_dir).items() if wanted(name, model.config)}
    shards = open_shards(files)
    slots = checkpoint_slots(model)
    remaining = {slot.name for slot in slots.values() if not slot.covers}  # a fused tensor covers several
    total = sum(shards[path].nbytes(name) for name, path in files.items() if name in shards[path].header)
    with byte_progress("Loading weights", total, enabled=progress) as advance:
        for name, path in sorted(files.items(), key=lambda item: (item[1], item[0])):
            shard = shards[path]
            slot = slots.get(name)
            if slot is None:
                raise CheckpointError(f"{path.name}: unexpected tensor {name} (not part of this model)")
            covered = slot.covers or (slot.name,)
            if not remaining.issuperset(covered):
                raise CheckpointError(f"{path.name}: tensor {name} is stored twice")
            tensor = shard.read(name)
            if tuple(tensor.shape) != slot.shape:
                raise CheckpointError(f"{path.name}: tensor {name} has shape {list(tensor.shape)}, expected {list(slot.shape)}")
            fill(model, slot, tensor)
            remaining.difference_update(covered)
            advance(tensor.numel() * tensor.element_size())
    if remaining:
        first = sorted(remaining)[0]
        more = f" (and {len(remaining) - 1} more)" if len(remaining) > 1 else ""
        raise CheckpointError(f"{Path(model_dir).name}: checkpoint is missing tensor {first}{more}")


def fill(model: GlmMoeLite, slot: Slot, tensor: torch.Tensor) -> None:
    """Copy a checkpoint tensor into its slot of an allocated model."""
    if slot.is_kv_b_proj:
        model.get_submodule(slot.target).load_kv_b_proj(tensor)
        return
    owner, _, leaf = slot.target.rpartition(".")
    target = getattr(model.get_submodule(owner), leaf)  # a parameter or a buffer
    view = target if slot.expert is None else target[slot.expert]
    if slot.parts > 1 or slot.expert is not None:
        view = view.chunk(slot.parts, dim=0)[slot.part]
    view.copy_(tensor)
