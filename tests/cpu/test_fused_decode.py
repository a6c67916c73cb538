"""The fused CPU decode step (engine/cpu/fused_decode.py + cpu_decode.cpp) against the modules.

Each check feeds the same tokens through both paths of one LLM (same quantized weights, same
cache layout) and compares the logits of every decode step, across several cache blocks.
"""

import pytest
import torch

from glmcode.engine import LLM, SamplingParams
from glmcode.engine.cpu import kernels as cpu_kernels
from glmcode.engine.cpu.features import has_bf16_dot
from glmcode.engine.cpu.fused_decode import FusedDecoder
from glmcode.engine.cpu.runner import FusedCpuRunner
from glmcode.engine.model.attention import expanded_is_cheaper
from glmcode.engine.quant.checkpoint import quantize_checkpoint
from glmcode.engine.runner import ModuleRunner
from tests.conftest import load_tiny_checkpoint_writer
from tests.engine.stepping import decode, new_sequence, prefill, teacher_forced_logits

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="needs our CPU kernels")

SCHEMES = {"int4": (4, 8), "int4-all": (4, 4), "int8": (8, 8)}
SHAPES = {
    "base": {},
    "no_q_lora": {"q_lora_rank": None},
    "top1_grouped": {"n_routed_experts": 6, "num_experts_per_tok": 1, "n_group": 2, "topk_group": 1},
}
TOKENS = list(range(5, 85))  # 10 prompt tokens, then 70 decode steps: five 16-slot blocks


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """quantized(shape, scheme) -> a quantized checkpoint directory, made once."""
    made = {}

    def make(shape: str, scheme: str):
        if (shape, scheme) not in made:
            root = tmp_path_factory.mktemp(f"{shape}-{scheme}")
            source = load_tiny_checkpoint_writer().make_tiny_checkpoint(root / "float", **SHAPES[shape])
            bits, linear_bits = SCHEMES[scheme]
            made[shape, scheme] = quantize_checkpoint(source, root / "q", bits=bits, linear_bits=linear_bits, progress=False)
        return made[shape, scheme]

    return make


def decode_logits(llm: LLM, fused: bool) -> torch.Tensor:
    """Logits of every decode step of TOKENS (teacher-forced) on one path: [steps, vocab]."""
    runner = llm.runner if fused else ModuleRunner(llm.model, llm.kv_cache)
    return teacher_forced_logits(llm, TOKENS, prefill_len=10, runner=runner)[1:]


def float32_llm(path) -> LLM:
    return LLM(path, dtype="float32", block_size=16, enable_prefix_caching=False, progress=False)


def paired_decode_logits(llm: LLM) -> tuple[torch.Tensor, torch.Tensor]:
    """Both paths' logits for each decode step of TOKENS, each step from the same cache.

    The cache is filled by the module path; each step runs the fused path on a copy first.
    """
    fused, modules, _ = paired_decode(llm)
    return fused, modules


def paired_decode(llm: LLM) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, ...]]]:
    """paired_decode_logits, plus each step's cache tensors (data, and an int8 cache's scales)
    as the fused step left them and as the module step did."""
    fused_runner, modules_runner = llm.runner, ModuleRunner(llm.model, llm.kv_cache)
    seq = new_sequence(TOKENS[:10])
    assert llm.blocks.allocate(seq, use_prefix_cache=False)
    prefill(llm, seq)
    cache = [t for t in (llm.kv_cache.data, llm.kv_cache.scales) if t is not None]
    fused, modules, written = [], [], []
    for token in TOKENS[10:]:
        seq.token_ids.append(token)
        before = [t.clone() for t in cache]
        fused.append(decode(llm, [seq], fused_runner)[0].clone())
        after_fused = [t.clone() for t in cache]
        for tensor, saved in zip(cache, before):
            tensor.copy_(saved)
        modules.append(decode(llm, [seq], modules_runner)[0].clone())
        written.append((after_fused, [t.clone() for t in cache]))
    llm.blocks.free_sequence(seq)
    return torch.stack(fused), torch.stack(modules), written


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_fused_step_matches_the_modules_in_float32(quantized, shape, scheme):
    llm = float32_llm(quantized(shape, scheme))
    assert isinstance(llm.runner, FusedCpuRunner)
    fused, modules = paired_decode_logits(llm)
    # Same weights and the same int8 activation quantization: only float rounding differs,
    # which now and then moves an activation across an int8 rounding boundary (a ~1e-2 change).
    step_error = (fused - modules).abs().amax(-1)
    assert (step_error < 1e-5).float().mean() >= 0.9, step_error
    assert step_error.max() < 0.2, step_error
    assert (fused.argmax(-1) == modules.argmax(-1)).float().mean() >= 0.95


@pytest.fixture(scope="module")
def twenty_heads(tmp_path_factory):
    """An int4-all checkpoint with GLM-4.7-Flash's 20 heads and 96 cached values per token."""
    root = tmp_path_factory.mktemp("twenty-heads")
    float_dir = load_tiny_checkpoint_writer().make_tiny_checkpoint(
        root / "float", kv_lora_rank=64, qk_rope_head_dim=32, num_attention_heads=20
    )
    return quantize_checkpoint(float_dir, root / "q", bits=4, linear_bits=4, progress=False)


@pytest.mark.parametrize("model, block_size", [("base", 16), ("twenty_heads", 32)])
def test_fused_step_with_a_bfloat16_cache_stays_close_to_float32(quantized, twenty_heads, model, block_size):
    """bf16 activations and cache: attention on the bf16 dot product where the CPU has it, else
    in float32 FMAs (4 heads and 40 cached values a token: a tail after the 16-value chunks; 20
    heads: four groups of 5)."""
    path = quantized("base", "int4-all") if model == "base" else twenty_heads
    reference = decode_logits(float32_llm(path), False)
    llm = LLM(path, dtype="bfloat16", block_size=block_size, enable_prefix_caching=False, progress=False)
    results = {fused: decode_logits(llm, fused) for fused in (True, False)}
    similarity = {fused: torch.cosine_similarity(out, reference, dim=-1).mean().item() for fused, out in results.items()}
    # A random tiny model amplifies bf16 rounding; the fused path (float32 activations) must do
    # at least as well as the module path (bf16 activations).
    assert similarity[True] > 0.99
    assert similarity[True] >= similarity[False] - 1e-3


def similarity_to(reference: torch.Tensor, logits: torch.Tensor) -> float:
    return torch.cosine_similarity(logits, reference, dim=-1).mean().item()


@pytest.mark.skipif(not has_bf16_dot(), reason="bfloat16 weights run fused only with AVX512_BF16")
def test_bfloat16_weights_run_fused_as_close_to_float32_as_the_modules(tiny_checkpoint):
    reference = decode_logits(float32_llm(tiny_checkpoint), False)
    llm = LLM(tiny_checkpoint, dtype="bfloat16", block_size=16, enable_prefix_caching=False, progress=False)
    assert isinstance(llm.runner, FusedCpuRunner)
    fused, modules = decode_logits(llm, True), decode_logits(llm, False)
    assert similarity_to(reference, fused) > 0.99
    assert similarity_to(reference, fused) >= similarity_to(reference, modules) - 1e-3


@pytest.mark.skipif(not has_bf16_dot(), reason="needs AVX512_BF16")
@pytest.mark.parametrize("heads, threads", [(4, 2), (20, 1)])
def test_amx_attention_matches_the_avx512_attention(tmp_path, heads, threads):
    """Attention on AMX tiles (where the CPU has them) against the VDPBF16PS attention: 96 cached
    values per token (a multiple of 32, as the tiles need), blocks of 32, a bf16 cache. 20 heads
    on one thread fill both tile groups (16 + 4) and read three blocks in a row."""
    path = load_tiny_checkpoint_writer().make_tiny_checkpoint(
        tmp_path, kv_lora_rank=64, qk_rope_head_dim=32, num_attention_heads=heads
    )
    llm = LLM(path, dtype="bfloat16", block_size=32, enable_prefix_caching=False, progress=False)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        amx = decode_logits(llm, True)
        llm.runner.decoder = FusedDecoder(llm.model, allow_amx=False)
        avx = decode_logits(llm, True)
    finally:
        torch.set_num_threads(previous)
    # both round queries and weights to bf16 and sum in float32, in different orders
    assert torch.cosine_similarity(amx, avx, dim=-1).min() > 0.9999
    assert (amx.argmax(-1) == avx.argmax(-1)).float().mean() >= 0.95


@pytest.fixture(scope="module")
def tile_shaped(tmp_path_factory):
    """An int4 checkpoint with 96 cached values per token (a multiple of 32, as AMX tiles need)."""
    root = tmp_path_factory.mktemp("tile-shaped")
    float_dir = load_tiny_checkpoint_writer().make_tiny_checkpoint(root / "float", kv_lora_rank=64, qk_rope_head_dim=32)
    return quantize_checkpoint(float_dir, root / "q", bits=4, linear_bits=8, progress=False)


@pytest.mark.parametrize("model, block_size", [("base", 16), ("tile_shaped", 16), ("tile_shaped", 32), ("twenty_heads", 32)])
def test_an_int8_cache_runs_fused_as_close_to_float32_as_the_modules(request, model, block_size):
    """The int8 latent cache on the fused path: with AVX512_BF16 each block dequantized to bf16
    for the attention kernels (AMX tiles at 32-token blocks where the CPU has them, VDPBF16PS at
    16), else in 16-bit integers (40 cached values a token: a tail after the 16-value chunks; 20
    heads: four groups of 5)."""
    path = request.getfixturevalue("quantized")("base", "int4") if model == "base" else request.getfixturevalue(model)
    reference = decode_logits(float32_llm(path), False)
    llm = LLM(path, dtype="bfloat16", block_size=block_size, kv_cache_dtype="int8", enable_prefix_caching=False,
              progress=False)  # fmt: skip
    assert isinstance(llm.runner, FusedCpuRunner)
    fused, modules = decode_logits(llm, True), decode_logits(llm, False)
    assert similarity_to(reference, fused) > 0.99
    assert similarity_to(reference, fused) >= similarity_to(reference, modules) - 2e-3


def test_the_fused_step_quantizes_new_latents_as_the_modules_do(tile_shaped):
    """Layer 0 sees the same input on both paths, so its new latent must be quantized the same
    (later layers see attention outputs that differ by bf16 rounding). The two codes compute the
    float latent with their own roundings: a scale may differ in its last bits, and a value that
    sits on a rounding boundary may land one step away."""
    llm = LLM(tile_shaped, dtype="float32", block_size=16, kv_cache_dtype="int8", enable_prefix_caching=False, progress=False)
    _, _, written = paired_decode(llm)
    for (fused_values, fused_scales), (module_values, module_scales) in written:
        assert (fused_values[0].int() - module_values[0].int()).abs().max() <= 1
        assert (fused_values[0] != module_values[0]).sum() <= 2
        torch.testing.assert_close(fused_scales[0], module_scales[0], rtol=1e-6, atol=0)
    last_slot = len(TOKENS) - 1
    assert written[-1][0][1][0, last_slot].min() > 0, "the fused step wrote the scales of its token"


def test_the_thread_count_changes_only_rounding(quantized):
    """Products come out the same; long contexts merge per-thread attention parts."""
    llm = float32_llm(quantized("base", "int4"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_logits(llm, True)
        torch.set_num_threads(2)
        two = decode_logits(llm, True)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, rtol=0, atol=1e-5)
    assert torch.equal(one[:30], two[:30])  # contexts under 2 blocks per thread: split by heads


def test_greedy_generation_is_the_same_on_both_paths(quantized):
    llm = float32_llm(quantized("base", "int4"))
    params = SamplingParams(max_tokens=48, temperature=0, stop_token_ids=[])
    fused = llm.generate(TOKENS[:12], params).token_ids
    llm.runner = ModuleRunner(llm.model, llm.kv_cache)
    modules = llm.generate(TOKENS[:12], params).token_ids
    assert fused == modules and len(fused) == 48


def test_used_only_where_it_applies(quantized, tiny_checkpoint, monkeypatch):
    path = quantized("base", "int4")
    def fused(llm: LLM) -> bool:
        return isinstance(llm.runner, FusedCpuRunner)

    assert fused(LLM(path, progress=False))
    assert not fused(LLM(tiny_checkpoint, dtype="float32", progress=False))  # float32 weights
    assert fused(LLM(path, kv_cache_dtype="int8", progress=False))
    monkeypatch.setenv("GLMCODE_FUSED_DECODE", "0")
    assert not fused(LLM(path, progress=False))


@torch.inference_mode()
def test_prefill_over_a_float32_cache_is_absorbed_and_matches_the_expanded_modules(quantized):
    """Over a cache read in float32 the fused runner prefills in the absorbed form even where
    the modules expand the context (measured faster on AVX2); both give the same logits."""
    llm = float32_llm(quantized("base", "int4-all"))
    tokens = [5 + (7 * i) % 150 for i in range(60)]
    assert expanded_is_cheaper(llm.config, len(tokens), len(tokens))
    logits = {}
    for name, runner in {"fused": llm.runner, "modules": ModuleRunner(llm.model, llm.kv_cache)}.items():
        seq = new_sequence(tokens)
        assert llm.blocks.allocate(seq, use_prefix_cache=False)
        assert runner.prefill_batch(seq, 0, len(tokens)).expanded == (name == "modules")
        logits[name] = runner.logits(runner.prefill(seq, 0, len(tokens)))
        llm.blocks.free_sequence(seq)
    # as for decode: float rounding now and then moves an activation across an int8 rounding step
    position_error = (logits["fused"] - logits["modules"]).abs().amax(-1)
    assert (position_error < 1e-4).float().mean() >= 0.7, position_error
    assert position_error.max() < 0.2, position_error
    assert (logits["fused"].argmax(-1) == logits["modules"].argmax(-1)).float().mean() >= 0.95
