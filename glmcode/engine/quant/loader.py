"""Build a GlmMoeLite whose projections and routed experts are quantized, in bounded memory.

The model is created on the meta device (no memory), then every checkpoint weight is put in
place as it is read: a quantized weight replaces its ``nn.Linear`` with an Int8Linear /
Int4Linear, a layer's routed experts become one experts module once all of them are read, and
the unquantized tensors (embedding, norms, router) become ordinary parameters. The float model
is never materialized, so a 60 GB bf16 checkpoint quantizes at load on a 24 GB machine.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from glmcode.engine.config import ModelConfig
from glmcode.engine.model import GlmMoeLite
from glmcode.engine.model.attention import MLAttention
from glmcode.engine.model.moe import Router
from glmcode.engine.quant.checkpoint import iter_checkpoint_weights, quantization_config
from glmcode.engine.quant.experts import quantized_experts
from glmcode.engine.quant.formats import (
    Int4Weight,
    Int8Weight,
    QuantizedWeight,
    QuantScheme,
    concat_rows,
    dequantize,
    int4_group_size,
)
from glmcode.engine.quant.linear import kv_b_projection, quantized_linear
from glmcode.errors import CheckpointError, UsageError

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_GATE_OR_UP = re.compile(r"^(.*)\.(gate_proj|up_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")

# Split by the attention into per-head W_UK / W_UV halves: dequantized at load, then requantized
# per head (kv_b_projection).
_DENSE_AT_LOAD = (".kv_b_proj.weight",)


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
    with torch.device("meta"):
        model = GlmMoeLite(config)
    placer = _Placer(model, dtype, torch.device(device))
    weights = iter_checkpoint_weights(model_dir, None if section else scheme)
    for name, value in _with_progress(weights, progress, f"loading int{scheme.expert_bits} weights"):
        if _is_mtp(name, config.num_hidden_layers):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        placer.place(name, value)
    placer.finish()
    if config.tie_word_embeddings:
        model.lm_head = _tied_head(model)
    return model.eval().requires_grad_(False)


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


class _Placer:
    """Puts each checkpoint weight into the meta model, replacing modules where it must."""

    def __init__(self, model: GlmMoeLite, dtype: torch.dtype, device: torch.device):
        self.model, self.dtype, self.device = model, dtype, device
        self.pending_pairs: dict[str, dict[str, torch.Tensor | QuantizedWeight]] = defaultdict(dict)
        self.pending_experts: dict[str, dict[tuple[int, str], QuantizedWeight]] = defaultdict(dict)

    def place(self, name: str, value: torch.Tensor | QuantizedWeight) -> None:
        if isinstance(value, torch.Tensor) or name.endswith(_DENSE_AT_LOAD):
            tensor = value if isinstance(value, torch.Tensor) else dequantize(value, self.dtype)
            if _EXPERT.match(name):
                raise CheckpointError(f"routed expert weight {name} is not quantized; quantize the checkpoint")
            if (pair := _GATE_OR_UP.match(name)) and self._has(pair.group(1) + ".gate_up_proj"):
                self._add_pair_half(pair.group(1), pair.group(2), tensor)
            elif name.endswith(_DENSE_AT_LOAD):
                self._load_kv_b_proj(name.removesuffix(".kv_b_proj.weight"), tensor)
            else:
                self._set_tensor(name, tensor)
        elif expert := _EXPERT.match(name):
            prefix, index, part = expert.groups()
            self.pending_experts[prefix][(int(index), part)] = value
            self._maybe_build_experts(prefix)
        elif (pair := _GATE_OR_UP.match(name)) and self._has(pair.group(1) + ".gate_up_proj"):
            self._add_pair_half(pair.group(1), pair.group(2), value)
        else:
            self._set_module(name.removesuffix(".weight"), quantized_linear(value, dtype=self.dtype, device=self.device))

    def finish(self) -> None:
        incomplete = [p for p, halves in self.pending_pairs.items() if halves] + list(self.pending_experts)
        if incomplete:
            raise CheckpointError(f"checkpoint is missing weights of {incomplete[0]}")
        missing = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()] if t.is_meta]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"checkpoint is missing tensor {missing[0]}{more}")

    # --- helpers ---

    def _has(self, path: str) -> bool:
        try:
            self.model.get_submodule(path)
        except AttributeError:
            return False
        return True

    def _add_pair_half(self, prefix: str, part: str, value: torch.Tensor | QuantizedWeight) -> None:
        halves = self.pending_pairs[prefix]
        halves[part] = value
        if len(halves) < 2:
            return
        gate, up = halves.pop("gate_proj"), halves.pop("up_proj")
        if isinstance(gate, torch.Tensor):
            self._set_tensor(prefix + ".gate_up_proj.weight", torch.cat([gate, up]))
        else:
            fused = quantized_linear(concat_rows([gate, up]), dtype=self.dtype, device=self.device)
            self._set_module(prefix + ".gate_up_proj", fused)

    def _maybe_build_experts(self, prefix: str) -> None:
        parts = self.pending_experts[prefix]
        num_experts = self.model.get_submodule(prefix).gate_up_proj.shape[0]
        if len(parts) < 3 * num_experts:
            return
        gate_up = [concat_rows([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(num_experts)]
        down = [parts[(e, "down_proj")] for e in range(num_experts)]
        experts = quantized_experts(gate_up, down, dtype=self.dtype, device=self.device)
        del self.pending_experts[prefix]
        self._set_module(prefix, experts)

    def _load_kv_b_proj(self, attention_path: str, weight: torch.Tensor) -> None:
        attention = self.model.get_submodule(attention_path)
        if tuple(weight.shape) != tuple(attention.kv_b_proj_shape):
            raise CheckpointError(f"{attention_path}.kv_b_proj has shape {list(weight.shape)}, expected {list(attention.kv_b_proj_shape)}")
        attention.kv_b_proj = kv_b_projection(weight, attention.kv_b_proj, dtype=self.dtype, device=self.device)

    def _set_module(self, path: str, module: nn.Module) -> None:
        parent, _, leaf = path.rpartition(".")
        owner = self.model.get_submodule(parent) if parent else self.model
        if not hasattr(owner, leaf):
            raise CheckpointError(f"unexpected tensor {path}.weight (not part of this model)")
        setattr(owner, leaf, module)

    def _set_tensor(self, name: str, tensor: torch.Tensor) -> None:
        parent, _, leaf = name.rpartition(".")
        try:
            owner = self.model.get_submodule(parent)
            slot = getattr(owner, leaf)
        except AttributeError:
            raise CheckpointError(f"unexpected tensor {name} (not part of this model)") from None
        if tuple(slot.shape) != tuple(tensor.shape):
            raise CheckpointError(f"tensor {name} has shape {list(tensor.shape)}, expected {list(slot.shape)}")
        dtype = torch.float32 if isinstance(owner, Router) else self.dtype
        value = tensor.to(device=self.device, dtype=dtype)
        if isinstance(slot, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(value, requires_grad=False))
        else:
            owner.register_buffer(leaf, value)


def _is_mtp(name: str, num_layers: int) -> bool:
    match = _LAYER.match(name)
    return match is not None and int(match.group(1)) >= num_layers


def _tied_head(model: GlmMoeLite) -> nn.Linear:
    embedding = model.model.embed_tokens.weight
    head = nn.Linear(embedding.shape[1], embedding.shape[0], bias=False, device="meta")
    head.weight = embedding
    return head


def _with_progress(items, enabled: bool, description: str):
    if not enabled:
        yield from items
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description} {task.completed} tensors"), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(description, total=None)
        for item in items:
            yield item
            bar.advance(task)


def checkpoint_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor of the main model (no MTP) and its shape, in the real layout."""
    with torch.device("meta"):
        model = GlmMoeLite(config)
    shapes: dict[str, tuple[int, ...]] = {}
    kv_b_halves = {
        f"{path}.kv_b_proj.{leaf}": path
        for path, module in model.named_modules()
        if isinstance(module, MLAttention)
        for leaf, _ in module.kv_b_proj.named_parameters()
    }
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in kv_b_halves:
            attention = kv_b_halves[name]
            shapes[attention + ".kv_b_proj.weight"] = tuple(model.get_submodule(attention).kv_b_proj_shape)
            continue
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            prefix, stacked = name.rsplit(".", 1)
            parts = ("gate_proj", "up_proj") if stacked == "gate_up_proj" else ("down_proj",)
            rows = tensor.shape[1] // len(parts)
            for e in range(tensor.shape[0]):
                shapes |= {f"{prefix}.{e}.{part}.weight": (rows, tensor.shape[2]) for part in parts}
        elif name.endswith("gate_up_proj.weight"):
            prefix = name.removesuffix("gate_up_proj.weight")
            half = (tensor.shape[0] // 2, tensor.shape[1])
            shapes |= {prefix + "gate_proj.weight": half, prefix + "up_proj.weight": half}
        else:
            shapes[name] = tuple(tensor.shape)
    return shapes


def random_quantized_model(
    config: ModelConfig, scheme: QuantScheme, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> GlmMoeLite:
    """A model of ``config``'s real shapes with random weights made directly in quantized form.

    For speed measurements: no float weights and no checkpoint on disk are ever needed.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = GlmMoeLite(config)
    placer = _Placer(model, dtype, torch.device("cpu"))
    for name, shape in checkpoint_shapes(config).items():
        bits = scheme.bits_for(name, shape)
        placer.place(name, _random_tensor(shape, generator) if bits is None else _random_quantized(shape, bits, scheme, generator))
    placer.finish()
    return model.eval().requires_grad_(False)


def _random_tensor(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator) * shape[-1] ** -0.5


def _random_quantized(shape, bits: int, scheme: QuantScheme, generator: torch.Generator) -> QuantizedWeight:
    rows, cols = shape
    step = cols**-0.5 / 4  # a weight std of about 1 / sqrt(cols): activations stay in range
    if bits == 8:
        values = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=generator)
        return Int8Weight(values, torch.full((rows,), step / 16))
    group = int4_group_size(cols, scheme.group_size)
    nibbles = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=generator)
    scales = torch.full((rows, cols // group), step, dtype=torch.bfloat16)
    return Int4Weight(nibbles, scales, torch.zeros_like(scales), group)
