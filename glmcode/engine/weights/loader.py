"""Loading safetensors weights into an already allocated model, one tensor at a time.

The model's parameters are allocated once (see model.build_model); each checkpoint tensor is
read from its memory-mapped shard and copied into its slot, so at most one tensor exists twice
at any moment. Checkpoints name experts one by one (`mlp.experts.7.up_proj.weight`) or, as
transformers can write them, fused (`mlp.experts.gate_up_proj`); both land in the stacked
[E, ...] parameters. Every inconsistency is a CheckpointError naming the tensor or file.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from safetensors import safe_open

from glmcode.engine.config import ModelConfig
from glmcode.engine.model import GlmMoeLite, build_model
from glmcode.engine.model.attention import MLAttention
from glmcode.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class _Slot:
    """Where one checkpoint tensor goes."""

    shape: list[int]
    fill: Callable[[torch.Tensor], None]
    covers: list[str]  # the names this tensor accounts for (several for fused experts)


def find_weight_files(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index or from a single model.safetensors."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        return _read_index(index_path)
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with _open_shard(single) as shard:
            return {name: single for name in shard.keys()}
    raise CheckpointError(f"{model_dir}: no {INDEX_FILE} or {SINGLE_FILE}; not a safetensors checkpoint")


def load_model(
    model_dir: str | Path, config: ModelConfig, *, dtype: torch.dtype, device: torch.device,
    quantization: str | None = None, progress: bool = True,
) -> GlmMoeLite:
    """The model with the checkpoint's weights, quantized when the checkpoint is or `quantization` asks."""
    from glmcode.engine.quant.loader import is_quantized_checkpoint, load_quantized_model

    if quantization is not None or is_quantized_checkpoint(model_dir):
        return load_quantized_model(config, model_dir, dtype=dtype, device=device, quantization=quantization, progress=progress)
    model = build_model(config, dtype, device)
    load_checkpoint(model, model_dir, progress=progress)
    return model


def load_checkpoint(
    model: GlmMoeLite, model_dir: str | Path, *, include_mtp: bool = False, progress: bool = True
) -> None:
    """Fill every parameter of `model` from the checkpoint in `model_dir`."""
    weight_files = find_weight_files(model_dir)
    config = model.config
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, path in weight_files.items():
        if _is_mtp(name, config.num_hidden_layers) and not include_mtp:
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the head shares the embedding; a stored copy is ignored
        by_file[path].append(name)

    slots = _checkpoint_slots(model)
    remaining = {name for slot in slots.values() for name in slot.covers}
    with _progress_bar(progress) as bar:
        task = bar.add_task("Loading weights", total=sum(p.stat().st_size for p in by_file))
        for path in sorted(by_file):
            with _open_shard(path) as shard:
                stored = set(shard.keys())
                for name in by_file[path]:
                    if name not in stored:
                        raise CheckpointError(f"{path.name}: tensor {name} is listed in the index but missing")
                    nbytes = _load_tensor(shard, name, path, slots, remaining)
                    bar.advance(task, nbytes)
    if remaining:
        first = sorted(remaining)[0]
        more = f" (and {len(remaining) - 1} more)" if len(remaining) > 1 else ""
        raise CheckpointError(f"{Path(model_dir).name}: checkpoint is missing tensor {first}{more}")


def _load_tensor(shard, name: str, path: Path, slots: dict[str, _Slot], remaining: set[str]) -> int:
    slot = slots.get(name)
    if slot is None:
        raise CheckpointError(f"{path.name}: unexpected tensor {name} (not part of this model)")
    shape = list(shard.get_slice(name).get_shape())
    if shape != slot.shape:
        raise CheckpointError(f"{path.name}: tensor {name} has shape {shape}, expected {slot.shape}")
    if not remaining.issuperset(slot.covers):
        raise CheckpointError(f"{path.name}: tensor {name} is stored twice")
    try:
        tensor = shard.get_tensor(name)
    except Exception as exc:  # safetensors raises its own error type for corrupt data
        raise CheckpointError(f"{path.name}: cannot read tensor {name}: {exc}") from None
    slot.fill(tensor)
    remaining.difference_update(slot.covers)
    return tensor.numel() * tensor.element_size()


def _checkpoint_slots(model: GlmMoeLite) -> dict[str, _Slot]:
    """Checkpoint tensor name -> slot, for every tensor the model needs.

    Names follow the modules, except where the model stores weights differently: gate_proj and
    up_proj share one gate_up_proj, routed experts are stacked, kv_b_proj is kept split.
    """
    slots: dict[str, _Slot] = {}
    for name, module in model.named_modules():
        if isinstance(module, MLAttention):
            kv_b = f"{name}.kv_b_proj.weight"
            slots[kv_b] = _Slot(list(module.kv_b_proj_shape), module.load_kv_b_proj, [kv_b])
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith(("self_attn.kv_b_proj.w_uk_t", "self_attn.kv_b_proj.w_uv")):
            continue  # filled from kv_b_proj above
        if name.endswith("mlp.experts.gate_up_proj"):
            _add_experts(slots, name, tensor, ("gate_proj", "up_proj"))
        elif name.endswith("mlp.experts.down_proj"):
            _add_experts(slots, name, tensor, ("down_proj",))
        elif name.endswith("gate_up_proj.weight"):
            prefix = name.removesuffix("gate_up_proj.weight")
            for part, view in zip(("gate_proj", "up_proj"), tensor.chunk(2, dim=0)):
                slots[f"{prefix}{part}.weight"] = _view_slot(f"{prefix}{part}.weight", view)
        else:
            slots[name] = _view_slot(name, tensor)
    return slots


def _view_slot(name: str, view: torch.Tensor) -> _Slot:
    return _Slot(list(view.shape), view.copy_, [name])


def _add_experts(slots: dict[str, _Slot], name: str, stacked: torch.Tensor, parts: tuple[str, ...]) -> None:
    """Per-expert slots into the stacked [E, ...] tensor, and one slot for the fused form."""
    prefix = name.rsplit(".", 1)[0]  # ...mlp.experts
    names = []
    for expert in range(stacked.shape[0]):
        for part, view in zip(parts, stacked[expert].chunk(len(parts), dim=0)):
            expert_name = f"{prefix}.{expert}.{part}.weight"
            slots[expert_name] = _view_slot(expert_name, view)
            names.append(expert_name)
    slots[name] = _Slot(list(stacked.shape), stacked.copy_, names)


def _is_mtp(name: str, num_layers: int) -> bool:
    match = _LAYER_INDEX.match(name)
    return match is not None and int(match.group(1)) >= num_layers


def _read_index(index_path: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path.name} is not a valid safetensors index: {exc!r}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path.name}: weight_map must map tensor names to file names")
    files = {}
    for file_name in set(weight_map.values()):
        path = index_path.parent / file_name
        if not path.is_file():
            raise CheckpointError(f"{index_path.name} refers to {file_name}, which does not exist")
        files[file_name] = path
    return {name: files[file_name] for name, file_name in weight_map.items()}


def _open_shard(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path.name} is not a readable safetensors file (truncated?): {exc}") from None


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )
