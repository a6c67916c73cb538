"""Time to first token of an agent step, first step against the next (after a tool result).

A conversation of about --context tokens (the real system prompt and tool specs, earlier file
reads) is sent through LocalBackend twice: step 1, then step 1's reply plus a tool result as
step 2. With the prefix cache, step 2 should prefill only the new tokens. Run once with the
prefix cache on and once off; prints JSON and a table.

    python scripts/bench_agent_steps.py [--config small|tiny] [--model-dir DIR] [--context 4096]
    python scripts/bench_agent_steps.py --config full --quantization int4-all --tool-output 2048 [--kv-cache-dtype int8]

With --quantization the model has random weights made directly in quantized form (the real
per-layer shapes; --config picks the layers: full 47, small 4, tiny 1) and runs on the CPU
kernels, with the prefix cache only (each step with it off would prefill the whole context).
Step 2 adds a tool result of about --tool-output tokens (the issue's agent step: 2K of tool
output after a 4K conversation held in the prefix cache).

TTFT here = from the step's start to the first event the backend yields: rendering the prompt to
ids, the engine's prefill and first sample, and parsing. Random weights: speed does not depend on the values. The test
tokenizer packs about 1.4 characters per token (GLM's about 3.5), so by default only three tool
specs go in, leaving room for some conversation in 4K tokens; --all-tools sends all of them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glmcode.agent.context import ROLE_AND_RULES  # noqa: E402
from glmcode.agent.messages import AssistantStep, system_message, tool_message, user_message  # noqa: E402
from glmcode.backends.base import Sampling, Thinking  # noqa: E402
from glmcode.backends.local import LocalBackend  # noqa: E402
from glmcode.chat_format import render_ids  # noqa: E402
from glmcode.engine import LLM, SamplingParams  # noqa: E402
from glmcode.events import Usage  # noqa: E402
from glmcode.tools.registry import all_tools  # noqa: E402

GREEDY = Sampling(max_tokens=16, temperature=0)
CORE_TOOLS = ("read_file", "edit_file", "run_tests")


def write_checkpoint(config: str, out: Path) -> Path:
    """The engine benchmark's checkpoint for `config` (tiny or small), random float32 weights."""
    return _script("bench_engine").write_checkpoint(config, out, "float32", with_weights=True)


def make_llm(args, scratch: Path, prefix_cache: bool) -> LLM:
    print(f"loading the {args.config} model (prefix cache {'on' if prefix_cache else 'off'})…", file=sys.stderr, flush=True)
    if args.quantization:
        quant = _script("bench_cpu_quant")
        layers = {"full": 47, "small": 4, "tiny": 1}[args.config]
        directory = scratch / f"q{int(prefix_cache)}"
        directory.mkdir()
        max_context = 2 * (args.context + args.tool_output) + 1024  # two steps' sequences
        return quant.build_llm(quant.FULL_CONFIG | {"num_hidden_layers": layers}, args.quantization, directory,
                               max_context, enable_prefix_caching=prefix_cache, block_size=256,
                               kv_cache_dtype=args.kv_cache_dtype)  # fmt: skip
    model_dir = args.model_dir or write_checkpoint(args.config, scratch / args.config)
    return LLM(model_dir, progress=False, enable_prefix_caching=prefix_cache, block_size=256,
               kv_cache_dtype=args.kv_cache_dtype)  # fmt: skip


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def tool_call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def conversation(tokenizer, specs: list[dict], context: int, repo: str) -> list[dict]:
    """System prompt, a request, then file reads until the prompt is about `context` tokens."""
    source = (ROOT / "glmcode" / "agent" / "loop.py").read_text()
    messages = [system_message(ROLE_AND_RULES.format(root=repo)), user_message("Fix the failing test in loop.py.")]
    for number in range(1000):
        call = tool_call(f"call_{number}", "read_file", {"path": "loop.py"})
        step = [{"role": "assistant", "content": "", "reasoning_content": f"Read part {number}.", "tool_calls": [call]}]
        start = 500 * number % len(source)
        step.append(tool_message(f"call_{number}", "read_file", source[start : start + 500]))
        if len(render_ids(tokenizer, messages + step, specs, clear_thinking=False)) > context:
            return messages
        messages += step
    return messages


def timed_step(llm: LLM, backend: LocalBackend, messages: list[dict], specs: list[dict]) -> tuple[dict, AssistantStep]:
    """One agent step through the backend; its time to first token is to the first event it yields
    (the prompt rendered, the uncached part prefilled, the first token sampled and parsed)."""
    started = time.perf_counter()
    step, ttft, usage = AssistantStep(), None, None
    for event in backend.stream(messages, specs, Thinking(), GREEDY):
        ttft = ttft if ttft is not None else time.perf_counter() - started
        usage = event if isinstance(event, Usage) else usage
        step.add(event)
    return {"prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.cached_tokens, "ttft_s": round(ttft, 4)}, step


def tool_output(tokenizer, tokens: int) -> str:
    """A test run's output of about `tokens` tokens (at least its two summary lines)."""
    lines = ["1 failed, 41 passed", "FAILED tests/test_loop.py::test_cancel - AssertionError"]
    number = 0
    while len(tokenizer.encode("\n".join(lines))) < tokens:
        lines.insert(-2, f"tests/test_loop.py::test_case_{number} PASSED [{number % 100:3d}%]")
        number += 1
    return "\n".join(lines)


def two_steps(llm: LLM, backend: LocalBackend, specs: list[dict], context: int, repo: str, output_tokens: int) -> tuple[dict, dict]:
    messages = conversation(llm.tokenizer, specs, context, repo)
    first, step = timed_step(llm, backend, messages, specs)
    reply = {**step.to_message(), "tool_calls": [tool_call("call_next", "run_tests", {})]}
    messages += [reply, tool_message("call_next", "run_tests", tool_output(llm.tokenizer, output_tokens))]
    second, _ = timed_step(llm, backend, messages, specs)
    return first, second


def measure(llm: LLM, prefix_cache: bool, context: int, every_tool: bool, repeats: int, output_tokens: int) -> dict:
    """Medians over `repeats` conversations. Each names another repository in the system prompt's
    first line, so they share only the tool specs the prompt opens with, as every session on a
    warm engine does: only the first conversation's step 1 prefills those (see its range)."""
    llm.generate(llm.tokenizer.encode("warm up " * 8), SamplingParams(max_tokens=2))  # one-time costs
    backend = LocalBackend(llm)
    specs = [tool.spec() for tool in all_tools() if every_tool or tool.name in CORE_TOOLS]
    pairs = []
    for number in range(repeats):
        print(f"conversation {number + 1}/{repeats}: two steps…", file=sys.stderr, flush=True)
        pairs.append(two_steps(llm, backend, specs, context, f"/repo{number}", output_tokens))
        for label, step in zip(("step 1", "step 2"), pairs[-1]):
            print(f"  {label}: {step['prompt_tokens']} tokens, {step['cached_tokens']} cached, first token after {step['ttft_s']:.1f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    first, second = (sorted(steps, key=lambda s: s["ttft_s"])[len(steps) // 2] for steps in zip(*pairs))
    for median, steps in zip((first, second), zip(*pairs)):
        median["ttft_range_s"] = [min(s["ttft_s"] for s in steps), max(s["ttft_s"] for s in steps)]
    ratio = round(second["ttft_s"] / first["ttft_s"], 4)
    kv_cache = str(llm.kv_cache.dtype).removeprefix("torch.")
    return {"prefix_cache": prefix_cache, "kv_cache": kv_cache, "step1": first, "step2": second, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "small", "full"], default="small", help="as in bench_engine.py")
    parser.add_argument("--quantization", choices=["int4", "int4-all", "int8"], default=None,
                        help="random quantized weights of the real shapes on the CPU kernels (full needs it)")
    parser.add_argument("--tool-output", type=int, default=32, help="tokens of the tool result step 2 adds")
    parser.add_argument("--model-dir", type=Path, help="an existing checkpoint instead of a generated one")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--all-tools", action="store_true", help="send every tool spec, not just three")
    parser.add_argument("--repeats", type=int, default=3, help="conversations per setting (median reported)")
    parser.add_argument("--kv-cache-dtype", choices=["int8"], default=None, help="the latent cache (default: the model's dtype)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.config == "full" and not (args.quantization or args.model_dir):
        raise SystemExit("--config full needs --quantization (the float model does not fit a CPU machine)")
    settings = (True,) if args.quantization else (True, False)
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for cache in settings:
            llm = make_llm(args, Path(scratch), cache)
            runs.append(measure(llm, cache, args.context, args.all_tools, args.repeats, args.tool_output))
            del llm
    report = {"config": args.model_dir and str(args.model_dir) or args.config, "quantization": args.quantization,
              "threads": args.threads, "load_average": os.getloadavg(), "runs": runs}  # fmt: skip
    print(json.dumps(report, indent=2))
    columns = ("step1 tokens", "step1 TTFT s", "step2 tokens", "cached", "step2 TTFT s", "step2 range s", "step2/step1")
    print("\n" + f"{'prefix cache':<13}" + "".join(f"{c:>14}" for c in columns))
    for run in runs:
        one, two = run["step1"], run["step2"]
        print(
            f"{'on' if run['prefix_cache'] else 'off':<13}{one['prompt_tokens']:>14}{one['ttft_s']:>14.3f}"
            f"{two['prompt_tokens']:>14}{two['cached_tokens']:>14}{two['ttft_s']:>14.3f}"
            f"{'%.2f-%.2f' % tuple(two['ttft_range_s']):>14}{run['ratio']:>14.1%}"
        )


if __name__ == "__main__":
    main()
