"""Time to first token of an agent step, first step against the next (after a tool result).

A conversation of about --context tokens (the real system prompt and tool specs, earlier file
reads) is sent through LocalBackend twice: step 1, then step 1's reply plus a tool result as
step 2. With the prefix cache, step 2 should prefill only the new tokens. Run once with the
prefix cache on and once off; prints JSON and a table.

    python scripts/bench_agent_steps.py [--config small|tiny] [--model-dir DIR] [--context 4096]

TTFT here = from the step's start to the first event the backend yields: rendering the prompt to
ids, the engine's prefill and first sample, and parsing. Random weights: speed does not depend on the values. The test
tokenizer packs about 1.4 characters per token (GLM's about 3.5), so by default only three tool
specs go in, leaving room for some conversation in 4K tokens; --all-tools sends all of them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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
    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "scripts" / "bench_engine.py")
    bench_engine = sys.modules["bench_engine"] = importlib.util.module_from_spec(spec)  # dataclasses need it
    spec.loader.exec_module(bench_engine)
    return bench_engine.write_checkpoint(config, out, "float32", with_weights=True)


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


def two_steps(llm: LLM, backend: LocalBackend, specs: list[dict], context: int, repo: str) -> tuple[dict, dict]:
    messages = conversation(llm.tokenizer, specs, context, repo)
    first, step = timed_step(llm, backend, messages, specs)
    reply = {**step.to_message(), "tool_calls": [tool_call("call_next", "run_tests", {})]}
    test_output = "1 failed, 41 passed\nFAILED tests/test_loop.py::test_cancel - AssertionError"
    messages += [reply, tool_message("call_next", "run_tests", test_output)]
    second, _ = timed_step(llm, backend, messages, specs)
    return first, second


def measure(model_dir: Path, prefix_cache: bool, context: int, every_tool: bool, repeats: int) -> dict:
    """Median over `repeats` conversations that share no prefix (each names another repo first)."""
    llm = LLM(model_dir, progress=False, enable_prefix_caching=prefix_cache, block_size=256)
    llm.generate(llm.tokenizer.encode("warm up " * 8), SamplingParams(max_tokens=2))  # one-time costs
    backend = LocalBackend(llm)
    specs = [tool.spec() for tool in all_tools() if every_tool or tool.name in CORE_TOOLS]
    pairs = [two_steps(llm, backend, specs, context, f"/repo{number}") for number in range(repeats)]
    first, second = (sorted(steps, key=lambda s: s["ttft_s"])[len(steps) // 2] for steps in zip(*pairs))
    ratio = round(second["ttft_s"] / first["ttft_s"], 4)
    return {"prefix_cache": prefix_cache, "step1": first, "step2": second, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "small"], default="small", help="as in bench_engine.py")
    parser.add_argument("--model-dir", type=Path, help="an existing checkpoint instead of a generated one")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--all-tools", action="store_true", help="send every tool spec, not just three")
    parser.add_argument("--repeats", type=int, default=3, help="conversations per setting (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or write_checkpoint(args.config, Path(scratch) / args.config)
        runs = [measure(model_dir, cache, args.context, args.all_tools, args.repeats) for cache in (True, False)]
    print(json.dumps({"config": args.model_dir and str(args.model_dir) or args.config, "runs": runs}, indent=2))
    columns = ("step1 tokens", "step1 TTFT s", "step2 tokens", "cached", "step2 TTFT s", "step2/step1")
    print("\n" + f"{'prefix cache':<13}" + "".join(f"{c:>13}" for c in columns))
    for run in runs:
        one, two = run["step1"], run["step2"]
        print(
            f"{'on' if run['prefix_cache'] else 'off':<13}{one['prompt_tokens']:>13}{one['ttft_s']:>13.3f}"
            f"{two['prompt_tokens']:>13}{two['cached_tokens']:>13}{two['ttft_s']:>13.3f}{run['ratio']:>13.1%}"
        )


if __name__ == "__main__":
    main()
