"""Time to first token of `glmcode ask`: cold, with the disk caches warm, attached to a warm server.

Three ways a request starts, each timed in the same run with real `glmcode ask` processes (the
cold start is the baseline), with glmcode's own system prompt (rules, tool specs, the repository
map: about 4.4K tokens) and one output token; each run asks another question:

- cold: in-process, nothing cached (`--no-server --no-disk-cache`): load the model from its
  checkpoint, prefill the whole prompt;
- disk: in-process with the disk caches an earlier run wrote: a quantized model mapped from its
  weights snapshot, the system part read from the KV disk tier;
- server: attached to a `glmcode serve` that already served that system part.

`--config small` writes a checkpoint of the real per-layer shapes with 4 layers (bf16 random
weights); `--config full` writes a quantized checkpoint of GLM-4.7-Flash's shapes (random
`--quantization` weights, 17.3 GB in int4-all; `--layers N` for fewer layers). Both also time
loads of a quantized checkpoint in this process (small: the small one quantized to int4): built
from the checkpoint, then mapped from its weights snapshot with the page cache warm and, as root,
dropped first.

    python scripts/bench_warm_start.py --config small --runs 3
    python scripts/bench_warm_start.py --config full --quantization int4-all --runs 3
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


def _cli_startup(home: Path, repo: Path) -> float:
    """A glmcode command that loads nothing: the floor under every `ask`."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "glmcode", "--version"], cwd=repo, env=_env(home), capture_output=True, check=True)
    return time.perf_counter() - started


def _user_prefill(model: Path, usage: dict, runs: int, home: Path) -> dict:
    """The engine's prefill of the uncached tokens after a cached prefix, at the server's sizes."""
    import torch

    from glmcode.engine import LLM, SamplingParams

    llm = LLM(model, progress=False, kv_cache_memory=512 << 20, weights_cache_dir=home / ".cache" / "glmcode" / "weights")
    cached, total = usage["cached_tokens"], usage["prompt_tokens"]
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 300, (cached,), generator=generator).tolist()
    llm.generate(prefix + [5], SamplingParams(max_tokens=1, temperature=0))
    seconds = []
    for _ in range(runs):
        tail = torch.randint(3, 300, (total - cached,), generator=generator).tolist()
        seconds.append(llm.generate(prefix + tail, SamplingParams(max_tokens=1, temperature=0)).stats.prefill_seconds)
    return summarize(seconds) | {"tokens": total - cached}


def run_cli(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="glmcode-warm-", dir=args.work_dir) as tmp:
        tmp = Path(tmp)
        print(f"writing the {args.config} checkpoint…", file=sys.stderr)
        if args.config == "small":
            model = _script("bench_engine").write_checkpoint("small", tmp / "small", "bfloat16", with_weights=True)
        else:
            quant = _script("bench_cpu_quant")
            config = quant.FULL_CONFIG | {"num_hidden_layers": args.layers}
            model = quant.write_random_quantized_checkpoint(config, args.quantization, tmp / "full")
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
        print("writing the disk caches…", file=sys.stderr)
        _ask(model, home, repo, "warm the disk caches", "--no-server")
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}: disk caches warm…", file=sys.stderr)
            seconds, record = _ask(model, home, repo, f"question {run}: what does app.py do?", "--no-server")
            samples["disk"].append(seconds)
            usage["disk"] = record["usage"]
        server = subprocess.Popen([sys.executable, "-m", "glmcode", "serve", "--model", str(model), "--device", "cpu",
                                   "--port", "0"], env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)  # fmt: skip
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
        user_prefill = _user_prefill(model, usage["server"], args.runs, home)
        if args.config == "small":
            from glmcode.engine.quant.checkpoint import quantize_checkpoint

            model = quantize_checkpoint(model, tmp / "small-int4", bits=4, progress=False)
        load = _load_times(model, tmp / "load-snapshots", args.runs)
    return {"config": args.config, "layers": args.layers if args.config == "full" else 4,
            "what": "wall time of `glmcode ask` with one output token", "usage": usage,
            "ttft_s": {name: summarize(values) for name, values in samples.items()},
            "cli_startup_s": summarize(startup), "user_text_prefill_s": user_prefill, "quantized_load": load}  # fmt: skip


def _load_times(model: Path, snapshots: Path, runs: int) -> dict:
    """Seconds to load a quantized checkpoint in this process: built from the checkpoint (the
    first time also saving its snapshot), then mapped from the snapshot, from a warm page cache
    and (as root) from a dropped one."""
    import gc

    from glmcode.engine import LLM

    def load(**options) -> float:
        started = time.perf_counter()
        llm = LLM(model, progress=False, kv_cache_memory=64 << 20, **options)
        seconds = time.perf_counter() - started
        del llm
        gc.collect()
        return seconds

    size = sum(path.stat().st_size for path in model.glob("*.safetensors"))
    result = {"checkpoint_gb": round(size / 1e9, 2)}
    print("load: from the checkpoint…", file=sys.stderr)
    result["from_checkpoint_s"] = summarize([load() for _ in range(2)])
    result["from_checkpoint_saving_snapshot_s"] = round(load(weights_cache_dir=snapshots), 2)
    print("load: mapped from the snapshot…", file=sys.stderr)
    result["snapshot_warm_page_cache_s"] = summarize([load(weights_cache_dir=snapshots) for _ in range(runs)])
    if os.geteuid() == 0:
        cold = []
        for _ in range(runs):
            subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
            cold.append(load(weights_cache_dir=snapshots))
        result["snapshot_dropped_page_cache_s"] = summarize(cold)
    return result


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
    load = report["quantized_load"]
    print(f"quantized load ({load['checkpoint_gb']} GB checkpoint), median s:", file=sys.stderr)
    for key in ("from_checkpoint_s", "snapshot_warm_page_cache_s", "snapshot_dropped_page_cache_s"):
        if key in load:
            print(f"  {key.removesuffix('_s'):<32}{load[key]['median']:>8.2f}  ({load[key]['min']:.2f}-{load[key]['max']:.2f})",
                  file=sys.stderr)  # fmt: skip
    print(f"  {'from_checkpoint_saving_snapshot':<32}{load['from_checkpoint_saving_snapshot_s']:>8.2f}", file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["small", "full"], default="small")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=47, help="full: fewer layers than 47 for a smaller machine")
    parser.add_argument("--quantization", default="int4-all", choices=["int4", "int4-all", "int8"], help="full's checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the checkpoint and caches go (full: ~40 GB)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    report = run_cli(args)
    report["threads"], report["load_average"] = args.threads, os.getloadavg()
    print_table(report)
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
