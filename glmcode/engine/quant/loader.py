"""Build a GlmMoeLite whose projections and routed experts are quantized, in bounded memory.

The model is created on the meta device (no memory), then every checkpoint weight is put in
its slot (weights/names.py) as it is read: a quantized weight replaces its ``nn.Linear`` with an
Int8Linear / Int4Linear, a layer's routed experts become one experts module once all of them
are read, and the unquantized tensors (embedding, norms, router) become ordinary parameters. The
float model is never materialized, so a 60 GB bf16 checkpoint quantizes at load on a 24 GB
machine.
"""

from __future__ import annotations

import ctypes
import functools
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from glmcode.engine.config import ModelConfig
from glmcode.engine.model import GlmMoeLite
from glmcode.engine.model.moe import Router
from glmcode.engine.quant.checkpoint import checkpoint_bytes, iter_checkpoint_weights, quantization_config
from glmcode.engine.quant.experts import quantized_experts
from glmcode.engine.quant.formats import QuantizedWeight, QuantScheme, concat_rows, dequantize
from glmcode.engine.quant.linear import kv_b_projection, quantized_linear
from glmcode.engine.weights.names import Slot, checkpoint_slots, wanted
from glmcode.engine.weights.progress import byte_progress
from glmcode.errors import CheckpointError, UsageError


def is_quantized_checkpoint(model_dir: str | Path) -> bool:
    return quantization_config(model_dir) is not None


def load_quantized_model(
    config: ModelConfig,
    model_dir: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    quantization: str | None = None,
    progress: bool = True,
) -> GlmMoeLite:
    """The model with quantized weights, from a quantized checkpoint or a float one.

    A quantized checkpoint is used as written (``quantization`` may be None or must match it);
    a float checkpoint is quantized on the fly with the named scheme (``"int4"`` / ``"int8"``).
    """
    section = quantization_config(model_dir)
    scheme = _scheme_for(model_dir, section, quantization)
    builder = QuantizedModelBuilder(config, dtype, torch.device(device))

    def keep(name: str) -> bool:
        return wanted(name, config)

    total = checkpoint_bytes(model_dir, keep)
    with byte_progress(f"loading int{scheme.expert_bits} weights", total, enabled=progress) as advance:
        for name, value in iter_checkpoint_weights(model_dir, None if section else scheme, keep=keep, advance=advance):
            builder.place(name, value)
    return builder.finish()


def _scheme_for(model_dir, section: dict | None, quantization: str | None) -> QuantScheme:
    requested = _named_scheme(quantization) if quantization is not None else None
    if section is None:
        if requested is None:
            raise UsageError(f"{model_dir} is not quantized; pass a quantization (int4, int4-all or int8)")
        return requested
    stored = QuantScheme(section["expert_bits"], section["linear_bits"], section["group_size"])
    if requested is not None and (requested.expert_bits, requested.linear_bits) != (stored.expert_bits, stored.linear_bits):
        raise UsageError(
            f"{model_dir} is already quantized (int{stored.expert_bits} experts, int{stored.linear_bits} "
            f"elsewhere), not as {quantization}; drop the quantization option or quantize the float checkpoint again"
        )
    return stored


def _named_scheme(name: str) -> QuantScheme:
    try:
        return QuantScheme.named(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


class QuantizedModelBuilder:
    """Puts each checkpoint weight into a meta model, replacing modules where it must."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device):
        with torch.device("meta"):
            self.model = GlmMoeLite(config)
        self.dtype, self.device = dtype, device
        self.slots = checkpoint_slots(self.model)
        self.pending_pairs: dict[str, dict[int, torch.Tensor | QuantizedWeight]] = defaultdict(dict)
        self.pending_experts: dict[str, dict[tuple[int, str, int], QuantizedWeight]] = defaultdict(dict)

    def place(self, name: str, value: torch.Tensor | QuantizedWeight) -> None:
        slot = self.slots.get(name)
        if slot is None:
            raise CheckpointError(f"unexpected tensor {name} (not part of this model)")
        if tuple(value.shape) != slot.shape:
            raise CheckpointError(f"tensor {name} has shape {list(value.shape)}, expected {list(slot.shape)}")
        if slot.is_kv_b_proj:  # split per head, then requantized per head (kv_b_projection)
            tensor = value if isinstance(value, torch.Tensor) else dequantize(value, self.dtype)
            attention = self.model.get_submodule(slot.target)
            attention.kv_b_proj = kv_b_projection(tensor, attention.kv_b_proj, dtype=self.dtype, device=self.device)
        elif slot.expert is not None:
            if isinstance(value, torch.Tensor):
                raise CheckpointError(f"routed expert weight {name} is not quantized; quantize the checkpoint")
            self._add_expert(slot, value)
        elif slot.parts > 1:
            self._add_pair_half(slot, value)
        elif isinstance(value, torch.Tensor):
            self._set_tensor(slot.target, value)
        else:
            self._set_module(slot.target.removesuffix(".weight"), quantized_linear(value, dtype=self.dtype, device=self.device))

    def finish(self) -> GlmMoeLite:
        """The built model; raises if some weight never came."""
        incomplete = [p for p, halves in self.pending_pairs.items() if halves] + list(self.pending_experts)
        if incomplete:
            raise CheckpointError(f"checkpoint is missing weights of {incomplete[0]}")
        missing = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()] if t.is_meta]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"checkpoint is missing tensor {missing[0]}{more}")
        model = self.model
        if model.config.tie_word_embeddings:
            model.lm_head = _tied_head(model)
        return model.eval().requires_grad_(False)

    def _add_pair_half(self, slot: Slot, value: torch.Tensor | QuantizedWeight) -> None:
        halves = self.pending_pairs[slot.target]
        halves[slot.part] = value
        if len(halves) < slot.parts:
            return
        parts = [halves.pop(part) for part in range(slot.parts)]
        if isinstance(parts[0], torch.Tensor):
            self._set_tensor(slot.target, torch.cat(parts))
        else:
            fused = quantized_linear(concat_rows(parts), dtype=self.dtype, device=self.device)
            self._set_module(slot.target.removesuffix(".weight"), fused)

    def _add_expert(self, slot: Slot, value: QuantizedWeight) -> None:
        experts_path, leaf = slot.target.rsplit(".", 1)  # ...mlp.experts, gate_up_proj | down_proj
        parts = self.pending_experts[experts_path]
        parts[(slot.expert, leaf, slot.part)] = value
        num_experts = self.model.get_submodule(experts_path).gate_up_proj.shape[0]
        if len(parts) < 3 * num_experts:
            return
        gate_up = [concat_rows([parts[(e, "gate_up_proj", 0)], parts[(e, "gate_up_proj", 1)]]) for e in range(num_experts)]
        down = [parts[(e, "down_proj", 0)] for e in range(num_experts)]
        del self.pending_experts[experts_path]
        self._set_module(experts_path, quantized_experts(gate_up, down, dtype=self.dtype, device=self.device))
        del gate_up, down, parts
        _return_free_heap()

    def _set_module(self, path: str, module: nn.Module) -> None:
        parent, _, leaf = path.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, leaf, module)

    def _set_tensor(self, name: str, tensor: torch.Tensor) -> None:
        parent, _, leaf = name.rpartition(".")
        owner = self.model.get_submodule(parent)
        dtype = torch.float32 if isinstance(owner, Router) else self.dtype
        value = tensor.to(device=self.device, dtype=dtype)
        if isinstance(getattr(owner, leaf), nn.Parameter):
            setattr(owner, leaf, nn.Parameter(value, requires_grad=False))
        else:
            owner.register_buffer(leaf, value)


def _return_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    Packing a layer's experts for torch's int4 kernels frees large temporaries between the tensors
    it keeps, and glibc holds on to those holes: 8 layers took 8.6 GB of RSS for 3.3 GB of tensors
    (so the whole model did not load in 24 GB); trimmed after each layer, 3.6 GB.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _tied_head(model: GlmMoeLite) -> nn.Linear:
    embedding = model.model.embed_tokens.weight
    head = nn.Linear(embedding.shape[1], embedding.shape[0], bias=False, device="meta")
    head.weight = embedding
    return head
