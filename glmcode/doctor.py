"""`glmcode doctor`: is this machine ready to run GLM-4.7-Flash, and if not, what to do.

Each check is one line: a verdict, what was found, and the fix when something is wrong.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from glmcode.options import INT4, INT4_ALL, INT8, SANDBOX_WORKSPACE_WRITE
from glmcode.sandbox import make_policy, mechanisms_for
from glmcode.sandbox.sandbox import Mechanism, install_advice, no_mechanism
from glmcode.settings import SECRET_ENV_VARS, Settings
from glmcode.weights import checkpoint_problems

# Weight bytes of the full model per precision (29.9 B parameters without the MTP layer; int4 is
# group-128 experts with int8 attention/dense weights, see reference/engine-notes.md), plus what
# the runtime needs on top for activations and a modest KV cache.
WEIGHT_BYTES = {"bfloat16": 60.0e9, INT8: 31.0e9, INT4: 17.3e9}
RUNTIME_HEADROOM_BYTES = 2.5e9


@dataclass(frozen=True)
class Check:
    verdict: str  # "ok" | "warn" | "fail"
    found: str
    fix: str = ""
    provides_model: bool = False  # passing means glmcode has a model to talk to

    def line(self) -> str:
        mark = {"ok": "✓", "warn": "!", "fail": "✗"}[self.verdict]
        return f"{mark} {self.found}" + (f" — {self.fix}" if self.fix else "")


def _gb(size: float) -> str:
    return f"{size / 1e9:.1f} GB"


def memory_bytes() -> tuple[int | None, int | None]:
    """(total, available) RAM from /proc/meminfo; None where the platform does not say."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    except OSError:
        return None, None

    def kib(name: str) -> int | None:
        return int(fields[name].split()[0]) * 1024 if name in fields else None

    return kib("MemTotal"), kib("MemAvailable")


def check_python() -> Check:
    return Check("ok", f"Python {platform.python_version()}")


def check_torch() -> tuple[list[Check], int | None]:
    """Torch and CUDA checks, and the GPU memory in bytes (None without CUDA)."""
    try:
        import torch
    except ImportError:
        fix = "pip install torch (the CPU build: --index-url https://download.pytorch.org/whl/cpu)"
        return [Check("fail", "torch is not installed", fix)], None
    checks = [Check("ok", f"torch {torch.__version__}")]
    if not torch.cuda.is_available():
        checks.append(Check("warn", "no CUDA GPU: the local engine runs on the CPU",
                            f"use --quantization {INT4} (or {INT4_ALL}, the fastest) on CPU, or --remote for speed"))
        return checks, None
    name = torch.cuda.get_device_name(0)
    total = torch.cuda.get_device_properties(0).total_memory
    checks.append(Check("ok", f"CUDA {torch.version.cuda}: {name}, {_gb(total)} GPU memory"))
    return checks, total


def check_cpu_kernels() -> Check:
    """Whether glmcode's CPU kernels can be built here (checked from CPU flags, nothing compiled)."""
    from glmcode.engine.cpu.features import cpu_features

    features = cpu_features()
    if "AVX2" not in features:
        return Check("warn", "this CPU lacks AVX2: int4/int8 run on torch's slower kernels",
                     "expect ~1-3 tokens/s on CPU; --remote is faster")  # fmt: skip
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if missing:
        return Check("warn", f"no {' or '.join(missing)} found: glmcode's CPU kernels cannot be built",
                     install_line(missing))

    return Check("ok", f"CPU kernels can be built ({', '.join(features)}): fused int4/int8 decode")


# package manager -> (install command, its package for each build tool doctor looks for)
_BUILD_TOOL_PACKAGES = {
    "apt-get": ("apt-get install", {"c++": "g++", "ninja": "ninja-build"}),
    "dnf": ("dnf install", {"c++": "gcc-c++", "ninja": "ninja-build"}),
    "yum": ("yum install", {"c++": "gcc-c++", "ninja": "ninja-build"}),
    "zypper": ("zypper install", {"c++": "gcc-c++", "ninja": "ninja"}),
    "pacman": ("pacman -S", {"c++": "gcc", "ninja": "ninja"}),
    "apk": ("apk add", {"c++": "g++", "ninja": "samurai"}),
}


def install_line(missing: list[str]) -> str:
    """How to install the missing build tools ("c++", "ninja") with this system's package manager."""
    for manager, (command, packages) in _BUILD_TOOL_PACKAGES.items():
        if shutil.which(manager):
            sudo = "" if os.geteuid() == 0 else "sudo "
            return f"install them: {sudo}{command} {' '.join(packages[tool] for tool in missing)}"
    if platform.system() == "Darwin":
        steps = {"c++": "xcode-select --install", "ninja": "brew install ninja"}
        return f"install them: {' && '.join(steps[tool] for tool in missing)}"
    return "install a C++ compiler (g++ or clang++) and ninja (`pip install ninja` works anywhere)"


def check_memory(total: int | None, available: int | None) -> Check:
    if total is None:
        return Check("warn", "cannot read this machine's memory size")
    return Check("ok", f"RAM {_gb(total)} total, {_gb(available or 0)} available")


def check_precisions(ram_available: int | None, gpu_memory: int | None) -> list[Check]:
    """Which weight precisions fit where; the largest memory decides."""
    where, memory = ("GPU", gpu_memory) if gpu_memory else ("RAM", ram_available)
    if memory is None:
        return [Check("warn", "cannot tell which precisions fit (memory size unknown)")]
    checks = []
    for precision, weights in WEIGHT_BYTES.items():
        needed = weights + RUNTIME_HEADROOM_BYTES
        flag = "" if precision == "bfloat16" else f" (--quantization {precision})"
        if needed <= memory:
            checks.append(Check("ok", f"{precision}{flag} fits in {where}: needs ~{_gb(needed)} of {_gb(memory)}"))
        else:
            found = f"{precision} does not fit in {where}: needs ~{_gb(needed)}, {_gb(memory)} there"
            checks.append(Check("warn", found, "pick a smaller precision or use --remote"))
    return checks


def check_model(settings: Settings) -> Check:
    model_dir = settings.model_dir()
    source = settings.sources.get("model", "default")
    if not model_dir.exists():
        return Check("fail", f"no model at {model_dir} ({source})",
                     "run `glmcode model pull`, pass --model DIR, or use --remote")
    problems = checkpoint_problems(model_dir)
    if problems:
        return Check("fail", f"model at {model_dir} is incomplete: {'; '.join(problems)}",
                     "re-run `glmcode model pull` (it resumes) or point --model at a complete checkpoint")
    return Check("ok", f"model found at {model_dir}", provides_model=True)


def check_remote_key(settings: Settings, env: Mapping[str, str]) -> Check:
    present = [name for name in SECRET_ENV_VARS if env.get(name)]
    if settings.api_key:
        present.append(f"api_key in {settings.sources.get('api_key')}")
    if present:
        return Check("ok", f"remote API key set ({', '.join(present)})", provides_model=True)
    return Check("warn", "no remote API key set",
                 "for --remote, export ZHIPUAI_API_KEY (open.bigmodel.cn) or ZAI_API_KEY (z.ai)")


def check_optional_tools() -> list[Check]:
    checks = []
    if shutil.which("git"):
        checks.append(Check("ok", "git found (undo checkpoints, diffs)"))
    else:
        checks.append(Check("warn", "git not found", "install git for /undo and /diff"))
    if importlib.util.find_spec("huggingface_hub"):
        checks.append(Check("ok", "huggingface_hub installed (`glmcode model pull` works)"))
    else:
        fix = 'pip install "glmcode[pull]" to use `glmcode model pull`'
        checks.append(Check("warn", "huggingface_hub not installed", fix))
    return checks


_SANDBOX_SUMMARIES = {
    "bubblewrap": "bubblewrap (private /tmp, no network, the whole process tree killed)",
    "seatbelt": "sandbox-exec (a Seatbelt profile, not yet tested on macOS by glmcode's suite)",
}


def check_sandbox(mechanisms: Sequence[Mechanism] | None = None) -> Check:
    """Which OS sandbox confines the agent's commands here (glmcode.sandbox), or why none can."""
    policy = make_policy(SANDBOX_WORKSPACE_WRITE, Path.cwd(), home=Path.home())
    mechanisms = mechanisms_for() if mechanisms is None else mechanisms
    reasons = {mechanism.NAME: mechanism.unavailable(policy) for mechanism in mechanisms}
    working = [name for name, reason in reasons.items() if reason is None]
    if not working:
        found = "; ".join(reason for reason in reasons.values() if reason) or no_mechanism()
        advice = f"{install_advice()}; until then" if install_advice() else "here"
        return Check("fail", f"no command sandbox works here: {found}",
                     f"{advice} commands that would run without asking (fix, --yes, yolo) are refused, "
                     "unless you choose --sandbox off")
    if working[0] in _SANDBOX_SUMMARIES:
        return Check("ok", f"command sandbox: {_SANDBOX_SUMMARIES[working[0]]}")
    why = "; ".join(reason for reason in reasons.values() if reason)
    return Check("warn", f"command sandbox: {working[0]}{f' ({why})' if why else ''}",
                 f"{install_advice()} for the stronger one: Landlock leaves UDP open before ABI 10 and lets "
                 "commands make no new top-level files in the repository")


def check_mcp_servers(settings: Settings, repo: Path) -> list[Check]:
    """Start every enabled MCP server (together) and report the ones that do not start."""
    from glmcode.mcp.manage import probe

    checks = []
    for name, started, what in probe(settings, repo):
        if started:
            checks.append(Check("ok", f"MCP server {name} started ({what})"))
        else:
            where = ", ".join(settings.mcp_servers[name].sources) or "the config"
            checks.append(Check("fail", f"MCP server {name} did not start: {what}",
                                f"fix [mcp_servers.{name}] in {where}, or set enabled = false; "
                                f"`glmcode mcp test {name}` tries it alone"))
    return checks


def run_checks(settings: Settings, env: Mapping[str, str] = os.environ,
               progress: Callable[[str], None] = lambda what: None, repo: Path | None = None) -> Iterator[Check]:
    """Every check in order, each as soon as it is done; `progress` hears what a slow one is doing."""
    yield check_python()
    progress("loading torch, looking for a CUDA GPU")
    torch_checks, gpu_memory = check_torch()
    yield from torch_checks
    if gpu_memory is None and torch_checks[0].verdict == "ok":
        yield check_cpu_kernels()
    total, available = memory_bytes()
    yield check_memory(total, available)
    yield from check_precisions(available, gpu_memory)
    progress("looking for the weights")
    yield check_model(settings)
    yield check_remote_key(settings, env)
    progress("looking for running servers")
    yield from check_servers(settings)
    yield check_disk_cache(settings)
    yield check_weights_cache(settings)
    yield check_sandbox()
    yield from check_optional_tools()
    if repo is not None and any(config.enabled for config in settings.mcp_servers.values()):
        progress("starting the MCP servers")
        yield from check_mcp_servers(settings, repo)


def check_servers(settings: Settings) -> list[Check]:
    """The running `glmcode serve` processes, and whether ask/chat/fix would use one."""
    from glmcode.server.state import READY, running_servers
    from glmcode.server.status import probe

    checks = []
    for record in running_servers():
        record.status = probe(record)
        used = record.status == READY and record.serves(settings)
        note = "; chat, ask and fix use it" if used else ""
        verdict = "ok" if record.status in (READY, "loading") else "warn"
        checks.append(Check(verdict, f"glmcode serve: {record.describe()}{note}", provides_model=used))
    if not checks:
        checks.append(Check("ok", "no glmcode serve running (`glmcode serve` keeps the model loaded between commands)"))
    return checks


def check_disk_cache(settings: Settings) -> Check:
    directory = settings.kv_cache_path()
    if directory is None:
        return Check("ok", "KV disk cache off (disk_cache = false)")
    files = list(directory.rglob("*.kv")) if directory.is_dir() else []
    size = sum(path.stat().st_size for path in files if path.exists())
    return Check("ok", f"KV disk cache at {directory}: {len(files)} blocks, {_gb(size)}")


def check_weights_cache(settings: Settings) -> Check:
    directory = settings.weights_cache_path()
    if directory is None:
        return Check("ok", "weights cache off (weights_cache = false or disk_cache = false)")
    files = list(directory.glob("*.model")) if directory.is_dir() else []  # weights/snapshot.py SUFFIX (no torch here)
    size = sum(path.stat().st_size for path in files if path.exists())
    return Check("ok", f"weights cache at {directory}: {len(files)} packed models, {_gb(size)} (quantized loads map them)")


def can_run_something(checks: list[Check]) -> bool:
    """A usable model exists: local weights, or a remote key."""
    return any(check.verdict == "ok" and check.provides_model for check in checks)
