"""Time to first token of `glmcode ask`: cold, with the KV disk tier warm, attached to a warm server.

Three ways a request starts, each timed in the same run (the cold start is the baseline):

- cold: in-process, nothing cached: load the model, prefill the whole prompt;
- disk: in-process, the prompt's system part on the KV disk tier (written by an earlier run);
- server: attached to a `glmcode serve` that already served that system part.

`--config small` (the real per-layer shapes, 4 layers, bf16 random weights written to a temp
checkpoint) times real `glmcode ask` processes end to end, with glmcode's own system prompt
(rules, tool specs, the repository map) and one output token; each run asks another question.
The prompt and cached token counts come from the runs' JSON.

`--config full` (GLM-4.7-Flash's shapes, int4 random weights built in memory: no checkpoint on
disk) times the same three paths inside one process over `--system-tokens` of shared prefix
and `--user-tokens` of question: cold = prefill of both; disk = the disk tier read + the
question's prefill (the in-memory prefix cache emptied first); server = one request through the
real server (uvicorn on 127.0.0.1) with the prefix warm. `--layers N` runs fewer layers (the
full 47 need ~19 GB); `--load-checkpoint DIR` also times loading a quantized checkpoint from disk
(twice: the second from a warm page cache).

    python scripts/bench_warm_start.py --config small --runs 3
    python scripts/bench_warm_start.py --config full --layers 8 --runs 3 [--load-checkpoint DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summarize(samples: list[float]) -> dict:
    return {"median": round(statistics.median(samples), 3), "min": round(min(samples), 3),
            "max": round(max(samples), 3), "runs": [round(s, 3) for s in samples]}  # fmt: skip


# ----- small: real `glmcode ask` processes -----


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLMCODE_", "XDG_"))}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), GLMCODE_MAX_OUTPUT_TOKENS="1", GLMCODE_TEMPERATURE="0",
               GLMCODE_KV_CACHE_MEMORY="512MiB", GLMCODE_MAX_TURNS="1")  # fmt: skip
    return env


def _ask(model: Path, home: Path, repo: Path, question: str, *flags: str) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "glmcode", "ask", question, "--model", str(model), "--device", "cpu",
                           "-o", "json", *flags], cwd=repo, env=_env(home), capture_output=True, text=True, timeout=1800)  # fmt: skip
    seconds = time.perf_counter() - started
    try:
        record = json.loads(done.stdout)
    except ValueError:
        raise SystemExit(f"glmcode ask failed ({done.returncode}): {done.stderr[-2000:]}") from None
    return seconds, record


def run_small(args) -> dict:
    bench_engine = _script("bench_engine")
    with tempfile.TemporaryDirectory(prefix="glmcode-warm-") as tmp:
        tmp = Path(tmp)
        print("writing the small checkpoint…", file=sys.stderr)
        model = bench_engine.write_checkpoint("small", tmp / "small", "bfloat16", with_weights=True)
        repo = tmp / "repo"
        repo.mkdir()
        (repo / "app.py").write_text("def add(a, b):\n    return a - b\n")
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        home = tmp / "home"
        home.mkdir()
        samples: dict[str, list[float]] = {"cold": [], "disk": [], "server": []}
        usage: dict[str, dict] = {}
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}: cold…", file=sys.stderr)
            seconds, record = _ask(model, home, repo, f"question {run}: what does app.py do?", "--no-server", "--no-disk-cache")
            samples["cold"].append(seconds)
            usage["cold"] = record["usage"]
        _ask(model, home, repo, "warm the disk tier", "--no-server")
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}: disk tier warm…", file=sys.stderr)
            seconds, record = _ask(model, home, repo, f"question {run}: what does app.py do?", "--no-server")
            samples["disk"].append(seconds)
            usage["disk"] = record["usage"]
        server = subprocess.Popen([sys.executable, "-m", "glmcode", "serve", "--model", str(model), "--device", "cpu",
                                   "--port", "0", "--no-disk-cache"], env=_env(home), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            for line in server.stdout:
                if "ready:" in line:
                    break
            _ask(model, home, repo, "warm the server")
            for run in range(args.runs):
                print(f"run {run + 1}/{args.runs}: attached to the server…", file=sys.stderr)
                seconds, record = _ask(model, home, repo, f"question {run}: what does app.py do?")
                samples["server"].append(seconds)
                usage["server"] = record["usage"]
            startup = [_cli_startup(home, repo) for _ in range(args.runs)]
        finally:
            server.terminate()
            server.wait(60)
        user_prefill = _user_prefill(model, usage["server"], args.runs)
        load = _int4_load(model, tmp / "small-int4")
    return {"config": "small", "what": "wall time of `glmcode ask` with one output token", "usage": usage,
            "ttft_s": {name: summarize(values) for name, values in samples.items()},
            "cli_startup_s": summarize(startup), "user_text_prefill_s": user_prefill, "int4_load": load}  # fmt: skip


def _int4_load(model: Path, destination: Path) -> dict:
    """Load time of the small config quantized to int4 (the real per-layer shapes), and what that
    rate means for the full model's 17.3 GB of int4 weights (loading is bound by bytes read)."""
    from glmcode.engine.quant.checkpoint import quantize_checkpoint

    quantized = quantize_checkpoint(model, destination, bits=4, progress=False)
    size = sum(path.stat().st_size for path in quantized.glob("*.safetensors"))
    times = _load_times(quantized)
    per_gb = times["warm_page_cache"] / (size / 1e9)
    return times | {"checkpoint_gb": round(size / 1e9, 2), "s_per_gb": round(per_gb, 2),
                    "full_model_estimate_s": round(per_gb * 17.3, 1)}  # fmt: skip


def _cli_startup(home: Path, repo: Path) -> float:
    """A glmcode command that loads nothing: the floor under every `ask`."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "glmcode", "--version"], cwd=repo, env=_env(home), capture_output=True, check=True)
    return time.perf_counter() - started


def _user_prefill(model: Path, usage: dict, runs: int) -> dict:
    """The engine's prefill of the uncached tokens after a cached prefix, at the server's sizes."""
    import torch

    from glmcode.engine import LLM, SamplingParams

    llm = LLM(model, progress=False, kv_cache_memory=512 << 20)
    cached, total = usage["cached_tokens"], usage["prompt_tokens"]
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 300, (cached,), generator=generator).tolist()
    llm.generate(prefix + [5], SamplingParams(max_tokens=1, temperature=0))
    seconds = []
    for _ in range(runs):
        tail = torch.randint(3, 300, (total - cached,), generator=generator).tolist()
        seconds.append(llm.generate(prefix + tail, SamplingParams(max_tokens=1, temperature=0)).stats.prefill_seconds)
    return summarize(seconds) | {"tokens": total - cached}


# ----- full: the engine paths in one process -----


def forget_memory_prefix_cache(llm) -> None:
    """Empty the in-memory prefix cache (as a new process would start) so the disk tier is read."""
    for block in llm.blocks.blocks:
        block.hash, block.token_ids = None, ()
    llm.blocks.hash_to_block.clear()


def run_full(args) -> dict:
    from glmcode.engine import SamplingParams

    quant = _script("bench_cpu_quant")
    config = quant.FULL_CONFIG | {"num_hidden_layers": args.layers}
    one = SamplingParams(max_tokens=1, temperature=0)
    result: dict = {"config": "full", "layers": args.layers, "quantization": args.quantization,
                    "system_tokens": args.system_tokens, "user_tokens": args.user_tokens}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="glmcode-warm-full-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        llm = quant.build_llm(config, args.quantization, tmp, args.system_tokens + args.user_tokens + 64,
                              enable_prefix_caching=True, disk_cache_dir=tmp / "kv",
                              identity=f"random {args.quantization} weights, {args.layers} layers, seed 0")  # fmt: skip
        result["build_s"] = round(time.perf_counter() - started, 1)
        vocab = llm.num_real_tokens
        system = quant.prompt_ids(args.system_tokens, vocab, seed=1)
        questions = [quant.prompt_ids(args.user_tokens, vocab, seed=100 + run) for run in range(args.runs + 1)]
        llm.generate(questions[-1][:16], one)  # warm-up: kernels, first-call costs
        cold, disk, server, user_only = [], [], [], []
        for run in range(args.runs):
            other_system = quant.prompt_ids(args.system_tokens, vocab, seed=1000 + run)  # never seen: cold
            print(f"run {run + 1}/{args.runs}: cold…", file=sys.stderr)
            cold.append(llm.generate(other_system + questions[run], one).stats.prefill_seconds)
        llm.generate(system + questions[-1], one)  # the disk tier (and memory) now hold the system part
        llm.close()
        for run in range(args.runs):
            forget_memory_prefix_cache(llm)
            print(f"run {run + 1}/{args.runs}: disk tier warm…", file=sys.stderr)
            disk.append(llm.generate(system + questions[run], one).stats.prefill_seconds)
        for run in range(args.runs):
            user_only.append(llm.generate(system + quant.prompt_ids(args.user_tokens, vocab, seed=500 + run), one).stats.prefill_seconds)
        with _served(llm) as base_url:
            import httpx

            for run in range(args.runs):
                print(f"run {run + 1}/{args.runs}: through the server…", file=sys.stderr)
                body = {"model": "glm-4.7-flash", "max_tokens": 1, "temperature": 0,
                        "messages": [{"role": "user", "content": "x"}]}  # fmt: skip
                server.append(_server_ttft(httpx, base_url, llm, system + quant.prompt_ids(args.user_tokens, vocab, seed=700 + run), body))
        result["disk_tier"] = vars(llm.disk_cache.stats)
    result["ttft_s"] = {"cold": summarize(cold), "disk": summarize(disk), "server": summarize(server)}
    result["user_text_prefill_s"] = summarize(user_only) | {"tokens": args.user_tokens}
    if args.load_checkpoint:
        result["load_s"] = _load_times(args.load_checkpoint)
    return result


class _served:
    """The real server (app, service, uvicorn) over an engine built in this process, on 127.0.0.1."""

    def __init__(self, llm):
        self.llm = llm

    def __enter__(self) -> str:
        import uvicorn

        from glmcode.server.app import create_app
        from glmcode.server.main import bind
        from glmcode.server.service import Service

        service = Service(model_names=["glm-4.7-flash"], model_dir="in memory", max_queue=4, max_num_seqs=8)
        service.ready(self.llm)
        self.listener = bind("127.0.0.1", 0)
        self.server = uvicorn.Server(uvicorn.Config(create_app(service, api_key=None), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.listener]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _server_ttft(httpx, base_url: str, llm, prompt_ids: list[int], body: dict) -> float:
    """One whole request of one token whose prompt is `prompt_ids` (rendered messages would be
    tokenized by the tiny tokenizer; the ids are given straight to the engine through a shim)."""
    from glmcode.server import service as service_module

    original = service_module.render_ids
    service_module.render_ids = lambda *a, **k: prompt_ids
    try:
        started = time.perf_counter()
        response = httpx.post(f"{base_url}/chat/completions", json=body, timeout=1800)
        seconds = time.perf_counter() - started
    finally:
        service_module.render_ids = original
    response.raise_for_status()
    return seconds


def _load_times(directory: Path) -> dict:
    """Loading a quantized checkpoint from disk, twice (the second from a warm page cache)."""
    from glmcode.engine import LLM

    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        llm = LLM(directory, progress=False, kv_cache_memory=64 << 20)
        seconds.append(time.perf_counter() - started)
        del llm
    return {"first": round(seconds[0], 1), "warm_page_cache": round(seconds[1], 1)}


# ----- report -----


def print_table(report: dict) -> None:
    ttft = report["ttft_s"]
    cold = ttft["cold"]["median"]
    print(f"{'path':<10}{'median s':>10}{'range s':>18}{'vs cold':>9}", file=sys.stderr)
    for name in ("cold", "disk", "server"):
        value = ttft[name]
        ratio = cold / value["median"] if value["median"] else float("inf")
        print(f"{name:<10}{value['median']:>10.2f}{value['min']:>9.2f}-{value['max']:<8.2f}{ratio:>8.1f}x", file=sys.stderr)
    user = report["user_text_prefill_s"]
    print(f"user text prefill ({user['tokens']} tokens): {user['median']:.2f} s; server minus that: "
          f"{ttft['server']['median'] - user['median']:.2f} s (goal: under 1 s)", file=sys.stderr)  # fmt: skip
    if "int4_load" in report:
        load = report["int4_load"]
        print(f"int4 load ({load['checkpoint_gb']} GB): {load['first']} s, {load['warm_page_cache']} s from a warm page "
              f"cache = {load['s_per_gb']} s/GB -> about {load['full_model_estimate_s']} s for the full 17.3 GB",
              file=sys.stderr)  # fmt: skip
    if "load_s" in report:
        print(f"checkpoint load: {report['load_s']}", file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["small", "full"], default="small")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=47, help="full: fewer layers than 47 for a smaller machine")
    parser.add_argument("--quantization", default="int4", choices=["int4", "int4-all", "int8"])
    parser.add_argument("--system-tokens", type=int, default=4096)
    parser.add_argument("--user-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--load-checkpoint", type=Path, default=None, help="full: also time loading this checkpoint")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    report = (run_small if args.config == "small" else run_full)(args)
    report["threads"], report["load_average"] = args.threads, os.getloadavg()
    print_table(report)
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
