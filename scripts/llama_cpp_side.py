"""llama.cpp on the same random GLM-4.7-Flash shapes: the baseline of bench_cpu_quant.py.

`write_gguf` writes a GGUF of a GLM-4.7-Flash config the way llama.cpp's converter lays it out
(architecture deepseek2, MLA with split k_b / v_b, merged experts) and quantized as
`llama-quantize Q4_0` would: Q4_0 everywhere, a Q6_K output, float32 norms, router and expert
bias. The weights are random bytes with small block scales (speed does not depend on the values),
written tensor by tensor so memory stays bounded.

`LlamaCppEngine` times llama-cpp-python on it: prefill of a prompt, prefill of a chunk after a
cached context, decode steps after a cached context. A cached context of C tokens is put into
llama.cpp's KV cache as random values through its sequence-state API (the bytes of a state are
learned from a small real one), as glmcode's side writes random latents into its cache: prefilling
32K tokens at llama.cpp's speed would take most of an hour and does not change a step's cost.

Needs the benchmark extra: `pip install -e ".[bench]"` (llama-cpp-python built from source, gguf).
"""

from __future__ import annotations

import ctypes
import struct
import time
from pathlib import Path

import numpy as np

Q4_0_SCALE = np.array([0.002], dtype=np.float16).view(np.uint8)  # the fp16 scale of each random Q4_0 block
Q6_K_SCALE = np.array([0.0005], dtype=np.float16).view(np.uint8)


def _quantized_bytes(rows: int, cols: int, kind, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of a quantized [rows, cols] matrix, each block's scale set small and finite."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    if kind == gguf.GGMLQuantizationType.Q4_0:
        blocks[:, :2] = Q4_0_SCALE  # d (fp16) leads a Q4_0 block
    else:
        blocks[:, 192:208] = 1  # Q6_K: 16 int8 sub-block scales, then d (fp16) last
        blocks[:, 208:210] = Q6_K_SCALE
    return blocks.reshape(rows, cols // block * size)


def _tensors(config: dict):
    """(name, numpy shape, kind) of every tensor llama.cpp loads for this config; kind: "f32",
    "q4_0" or "q6_k". Shapes are numpy order (the GGUF lists them innermost first)."""
    hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    nope, rope, v_dim = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    latent, q_lora, experts = config["kv_lora_rank"], config["q_lora_rank"], config["n_routed_experts"]
    inter, dense_inter, vocab = config["moe_intermediate_size"], config["intermediate_size"], config["vocab_size"]
    yield "token_embd.weight", (vocab, hidden), "q4_0"
    yield "output_norm.weight", (hidden,), "f32"
    yield "output.weight", (vocab, hidden), "q6_k"
    for i in range(layers):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (hidden,), "f32"
        yield b + "attn_q_a_norm.weight", (q_lora,), "f32"
        yield b + "attn_kv_a_norm.weight", (latent,), "f32"
        yield b + "attn_q_a.weight", (q_lora, hidden), "q4_0"
        yield b + "attn_q_b.weight", (heads * (nope + rope), q_lora), "q4_0"
        yield b + "attn_kv_a_mqa.weight", (latent + rope, hidden), "q4_0"
        yield b + "attn_k_b.weight", (heads, latent, nope), "q4_0"
        yield b + "attn_v_b.weight", (heads, v_dim, latent), "q4_0"
        yield b + "attn_output.weight", (hidden, heads * v_dim), "q4_0"
        yield b + "ffn_norm.weight", (hidden,), "f32"
        if i < config["first_k_dense_replace"]:
            yield b + "ffn_gate.weight", (dense_inter, hidden), "q4_0"
            yield b + "ffn_up.weight", (dense_inter, hidden), "q4_0"
            yield b + "ffn_down.weight", (hidden, dense_inter), "q4_0"
            continue
        yield b + "ffn_gate_inp.weight", (experts, hidden), "f32"
        yield b + "exp_probs_b.bias", (experts,), "f32"
        yield b + "ffn_gate_exps.weight", (experts, inter, hidden), "q4_0"
        yield b + "ffn_up_exps.weight", (experts, inter, hidden), "q4_0"
        yield b + "ffn_down_exps.weight", (experts, hidden, inter), "q4_0"
        yield b + "ffn_gate_shexp.weight", (inter, hidden), "q4_0"
        yield b + "ffn_up_shexp.weight", (inter, hidden), "q4_0"
        yield b + "ffn_down_shexp.weight", (hidden, inter), "q4_0"


def write_gguf(config: dict, path: Path, *, progress=print) -> Path:
    """The GGUF for `config` (a GLM-4.7-Flash config.json dict) at `path`; returns path."""
    import gguf

    kinds = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q6_k": gguf.GGMLQuantizationType.Q6_K}
    writer = gguf.GGUFWriter(str(path), "deepseek2")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(1)  # MLA as MQA over the latent
    writer.add_rope_freq_base(float(config["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_leading_dense_block_count(config["first_k_dense_replace"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_q_lora_rank(config["q_lora_rank"])
    writer.add_kv_lora_rank(config["kv_lora_rank"])
    writer.add_key_length(config["kv_lora_rank"] + config["qk_rope_head_dim"])
    writer.add_value_length(config["kv_lora_rank"])
    writer.add_key_length_mla(config["qk_nope_head_dim"] + config["qk_rope_head_dim"])
    writer.add_value_length_mla(config["v_head_dim"])
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_expert_count(config["n_routed_experts"])
    writer.add_expert_shared_count(config["n_shared_experts"])
    writer.add_expert_weights_scale(config["routed_scaling_factor"])
    writer.add_expert_weights_norm(bool(config["norm_topk_prob"]))
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    writer.add_rope_dimension_count(config["qk_rope_head_dim"])
    # A vocabulary of placeholder tokens: the benchmark feeds token ids, never text.
    vocab = config["vocab_size"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(["a", "b", "ab"] + [f"<t{i}>" for i in range(3, vocab)])
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab)
    writer.add_token_merges(["a b"])  # llama.cpp wants a BPE vocabulary to have merges
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    tensors = list(_tensors(config))
    for name, shape, kind in tensors:
        if kind == "f32":
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            rows, cols = int(np.prod(shape[:-1])), shape[-1]
            block, size = gguf.GGML_QUANT_SIZES[kinds[kind]]
            writer.add_tensor_info(name, shape, np.dtype(np.float32), rows * cols // block * size, raw_dtype=kinds[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for index, (name, shape, kind) in enumerate(tensors):
        if kind == "f32":
            data = (rng.standard_normal(shape, dtype=np.float32) * 0.02 + (1.0 if "norm" in name else 0.0)).astype(np.float32)
        else:
            data = _quantized_bytes(int(np.prod(shape[:-1])), shape[-1], kinds[kind], rng)
        writer.write_tensor_data(data)
        if progress and (index + 1) % 200 == 0:
            progress(f"  gguf: {index + 1}/{len(tensors)} tensors, {time.perf_counter() - started:.0f}s")
    writer.close()
    return path


class LlamaCppEngine:
    """llama-cpp-python over a GGUF: CPU only, flash attention on, n_threads threads."""

    def __init__(self, path: Path, *, threads: int, n_ctx: int, batch: int = 512):
        from llama_cpp import Llama

        started = time.perf_counter()
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=batch, n_ubatch=batch, n_threads=threads,
                         n_threads_batch=threads, flash_attn=True, verbose=False, n_gpu_layers=0)  # fmt: skip
        self.load_s = time.perf_counter() - started
        self.batch = batch
        self.vocab = self.llm.n_vocab()
        self._state_layout: tuple[bytes, int, int, int] | None = None

    # ----- the cache -----

    def clear(self) -> None:
        self.llm.reset()
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)

    def fill_context(self, tokens: int, rng: np.random.Generator) -> None:
        """Sequence 0 holds `tokens` cached positions of random keys (no compute)."""
        import llama_cpp

        header, k_type, row_bytes, n_layer = self._learn_state_layout()
        meta = np.zeros((tokens, 3), dtype=np.int32)  # pos, n_seq_id = 1, seq id 0
        meta[:, 0] = np.arange(tokens)
        meta[:, 1] = 1
        head = header + struct.pack("<I", tokens) + meta.tobytes() + struct.pack("<II", 0, n_layer)  # v_trans = 0
        layer_head = struct.pack("<iQ", k_type, row_bytes)
        # One layer's random keys serve every layer (the values do not matter), written straight
        # into one buffer: a 32K context of the full model is ~1.8 GB of state.
        keys = rng.standard_normal((tokens, row_bytes // 2), dtype=np.float32).astype(np.float16).view(np.uint8).ravel()
        per_layer = len(layer_head) + keys.size
        blob = bytearray(len(head) + n_layer * per_layer)
        blob[: len(head)] = head
        view = np.frombuffer(blob, dtype=np.uint8)
        for layer in range(n_layer):
            at = len(head) + layer * per_layer
            blob[at : at + len(layer_head)] = layer_head
            view[at + len(layer_head) : at + per_layer] = keys
        del view, keys
        self.clear()
        buffer = (ctypes.c_uint8 * len(blob)).from_buffer(blob)
        read = llama_cpp.llama_state_seq_set_data(self.llm.ctx, buffer, len(blob), 0)
        del buffer
        if read != len(blob):
            raise RuntimeError(f"llama.cpp took {read} of {len(blob)} state bytes")
        self.llm.n_tokens = tokens
        self.llm.input_ids[:tokens] = rng.integers(0, self.vocab, tokens)

    def _learn_state_layout(self) -> tuple[bytes, int, int, int]:
        """From a real 2-token state: its header up to the cell count, the key type, the bytes of
        one cached key row, the layer count. Checks the layout accounts for every byte."""
        if self._state_layout is not None:
            return self._state_layout
        import llama_cpp

        self.clear()
        self.llm.eval([5, 6])
        size = llama_cpp.llama_state_seq_get_size(self.llm.ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        llama_cpp.llama_state_seq_get_data(self.llm.ctx, buffer, size, 0)
        blob = bytes(buffer)
        # magic, seq id, n_stream, cell count (2), 2 x (pos, n_seq_id, seq id), v_trans, n_layer
        cells_at = 12
        if struct.unpack_from("<I", blob, cells_at)[0] != 2:
            raise RuntimeError("unexpected llama.cpp sequence-state layout")
        v_trans, n_layer = struct.unpack_from("<II", blob, cells_at + 4 + 2 * 12)
        k_type, row_bytes = struct.unpack_from("<iQ", blob, cells_at + 4 + 2 * 12 + 8)
        expected = cells_at + 4 + 2 * 12 + 8 + n_layer * (12 + 2 * row_bytes)
        if v_trans or len(blob) != expected or k_type != 1:  # one f16 key row per token, no values
            raise RuntimeError(f"unexpected llama.cpp sequence-state layout ({len(blob)} bytes, expected {expected})")
        self._state_layout = (blob[:cells_at], k_type, row_bytes, n_layer)
        self.clear()
        return self._state_layout

    # ----- timings -----

    def prefill(self, tokens: list[int]) -> float:
        """Seconds to evaluate `tokens` after what the cache holds (the logits of the last one)."""
        started = time.perf_counter()
        self.llm.eval(tokens)
        return time.perf_counter() - started

    def drop_after(self, position: int) -> None:
        """Forget cached positions from `position` on (to time the same chunk again)."""
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.llm.ctx), 0, position, -1)
        self.llm.n_tokens = position

    def decode_step(self, token: int) -> float:
        started = time.perf_counter()
        self.llm.eval([token])
        return time.perf_counter() - started


def version() -> str:
    """llama-cpp-python's version (each pins one llama.cpp commit)."""
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}"
