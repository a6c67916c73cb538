"""The checkpoint-name mapping: which checkpoint tensor fills which part of the model.

Checkpoint names follow the reference implementation's modules
(`model.layers.3.self_attn.q_a_proj.weight`); the model stores weights differently in three
places (model/decoder.py): gate_proj and up_proj are one gate_up_proj, routed experts are
stacked per layer, and kv_b_proj is kept as its two per-head halves.

`checkpoint_slots(model)` derives from the model definition itself the slot of every tensor a
checkpoint holds for it; the float loader, the quantized loader and the benchmarks' random
weights all place tensors through it. `weight_role(name)` tells from a name alone (any layer,
the MTP block's too) what kind of weight a tensor is: the quantization scheme picks bit widths
by it, in the converter and at load.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from glmcode.engine.config import ModelConfig
from glmcode.engine.weights.layout import is_mtp

KV_B_PROJ = ".self_attn.kv_b_proj.weight"


@dataclass(frozen=True)
class Slot:
    """Where one checkpoint tensor goes."""

    name: str  # the checkpoint's tensor name
    shape: tuple[int, ...]
    target: str  # the model's parameter or buffer; for kv_b_proj, the attention module
    expert: int | None = None  # its index in a stacked [E, ...] target
    part: int = 0  # the row block of the target it fills, of `parts` (gate 0, up 1 of 2)
    parts: int = 1
    covers: tuple[str, ...] = ()  # the per-expert names a fused [E, ...] tensor stands for

    @property
    def is_kv_b_proj(self) -> bool:
        return self.name.endswith(KV_B_PROJ)


def checkpoint_slots(model: nn.Module) -> dict[str, Slot]:
    """Checkpoint tensor name -> slot, for every tensor the model (meta or real) needs.

    Routed experts come under their per-expert names (`mlp.experts.7.up_proj.weight`) and, as
    transformers can also write them, fused (`mlp.experts.gate_up_proj`, covering all of them).
    """
    slots: dict[str, Slot] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        shape = tuple(tensor.shape)
        if name.endswith(".self_attn.kv_b_proj.w_uk_t"):
            attention = name.removesuffix(".kv_b_proj.w_uk_t")
            kv_b = attention + ".kv_b_proj.weight"
            slots[kv_b] = Slot(kv_b, tuple(model.get_submodule(attention).kv_b_proj_shape), attention)
        elif name.endswith(".self_attn.kv_b_proj.w_uv"):
            continue  # the kv_b_proj slot above fills both halves
        elif name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            _add_experts(slots, name, shape)
        elif name.endswith("gate_up_proj.weight"):
            prefix = name.removesuffix("gate_up_proj.weight")
            half = (shape[0] // 2, shape[1])
            for part, leaf in enumerate(("gate_proj", "up_proj")):
                slots[f"{prefix}{leaf}.weight"] = Slot(f"{prefix}{leaf}.weight", half, name, part=part, parts=2)
        else:
            slots[name] = Slot(name, shape, name)
    return slots


def _add_experts(slots: dict[str, Slot], stacked: str, shape: tuple[int, ...]) -> None:
    """Per-expert slots into a stacked [E, rows, cols] parameter, and one for its fused form."""
    prefix, leaf = stacked.rsplit(".", 1)  # ...mlp.experts, gate_up_proj | down_proj
    parts = ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)
    rows = shape[1] // len(parts)
    names = []
    for expert in range(shape[0]):
        for part, part_name in enumerate(parts):
            name = f"{prefix}.{expert}.{part_name}.weight"
            slots[name] = Slot(name, (rows, shape[2]), stacked, expert=expert, part=part, parts=len(parts))
            names.append(name)
    slots[stacked] = Slot(stacked, shape, stacked, covers=tuple(names))


def wanted(name: str, config: ModelConfig) -> bool:
    """Whether the main model loads this checkpoint tensor: not the MTP block, and not a stored
    lm_head when the head shares the embedding."""
    if is_mtp(name, config.num_hidden_layers):
        return False
    return not (name == "lm_head.weight" and config.tie_word_embeddings)


def weight_role(name: str) -> str | None:
    """What a 2-D checkpoint tensor is: "expert" (routed or shared), "kv_b_proj", "linear" (any
    other matrix, lm_head included), or None for the embedding and the router (never quantized:
    the one is only gathered, the other is tiny and routes in float32)."""
    if not name.endswith(".weight") or "embed_tokens" in name or name.endswith(".mlp.gate.weight"):
        return None
    if name.endswith(KV_B_PROJ):
        return "kv_b_proj"
    if ".experts." in name or ".shared_experts." in name:
        return "expert"
    return "linear"
