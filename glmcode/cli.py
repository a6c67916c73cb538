"""The `glmcode` command: flags and commands only; the wiring lives in glmcode.launch.

Exit codes (also in the README): 0 done, 1 error, 2 usage, 3 model or backend unavailable,
4 limit reached, 5 `fix` finished but the tests still fail, 130 interrupted.

`--remote` takes an optional value, which Typer cannot express, so `main` rewrites the
argument list first: a bare `--remote` becomes `--remote=zhipu` unless the next word is a
preset (`zhipu`, `zai`) or an http(s):// URL. That keeps `glmcode ask --remote "why?"` meaning
the prompt "why?" on the default remote.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from glmcode import __version__
from glmcode.console import ApprovalPrompt, JsonRenderer, RunReport, RunStats, make_renderer
from glmcode.errors import GlmcodeError, Interrupted, UsageError
from glmcode.launch import (
    backend_label,
    build_agent,
    ctrl_c_cancels,
    describe_failure,
    exit_code_for,
    model_label,
    open_backend,
    open_session,
    run_tests,
    secrets_of,
    usage_dict,
)
from glmcode.settings import (
    REMOTE_PRESETS,
    Settings,
    default_model_dir,
    load_settings,
    repo_config_path,
    user_config_path,
)
from glmcode.weights import checkpoint_problems, pull_checkpoint

OUTPUT_FORMATS = ("text", "json", "stream-json")

app = typer.Typer(
    name="glmcode",
    help="A coding assistant for GLM-4.7-Flash, local or remote.",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
model_app = typer.Typer(help="Inspect, download and quantize the model weights.")
config_app = typer.Typer(help="Show the configuration.")
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")

# --- shared flags ---------------------------------------------------------------------------------

_MODEL = "Model"
_AGENT = "Agent"


def _model_option(*names: str, help: str, **extra: Any) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=_MODEL, **extra)


def _agent_option(*names: str, help: str, **extra: Any) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=_AGENT, **extra)


ModelOpt = Annotated[str | None, _model_option("--model", help="Checkpoint directory (env GLMCODE_MODEL).")]
RemoteOpt = Annotated[str | None, _model_option(
    "--remote", metavar="[zhipu|zai|URL]",
    help="Use a hosted model: bare --remote = zhipu; or zai; or an OpenAI-compatible base URL.")]
RemoteModelOpt = Annotated[str | None, _model_option("--remote-model", help="Model name for --remote.")]
DeviceOpt = Annotated[str | None, _model_option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str | None, _model_option("--dtype", help="float32, bfloat16 or float16.")]
QuantOpt = Annotated[str | None, _model_option(
    "--quantization", "-q", help="Weight-only: int4 (int4 experts, int8 elsewhere), int4-all or int8.")]
ApprovalOpt = Annotated[str | None, _agent_option("--approval", "-a", help="plan, ask, auto-edit or yolo.")]
YesOpt = Annotated[bool, _agent_option("--yes", "-y", help="Approve everything the approval mode would ask about.")]
NoThinkOpt = Annotated[bool, _agent_option("--no-think", help="Answer without thinking first.")]
ShowThinkingOpt = Annotated[bool, _agent_option("--show-thinking", help="Show the model's thinking in full.")]
MaxTurnsOpt = Annotated[int | None, _agent_option("--max-turns", min=1, help="Most agent steps for this request.")]
ResumeOpt = Annotated[str | None, _agent_option("--resume", "-r", metavar="ID", help="Continue the saved session ID.")]
ContinueOpt = Annotated[bool, _agent_option("--continue", "-c", help="Continue the last session in this repo.")]
RepoOpt = Annotated[Path | None, typer.Option(
    "--repo", file_okay=False, exists=True,
    help="Repository to work in (default: the git root around the current directory).")]
FormatOpt = Annotated[str, typer.Option(
    "--output-format", "-o", help="text, json (one object at the end) or stream-json (one event per line).")]
ReplayOpt = Annotated[Path | None, typer.Option(
    "--replay", hidden=True, envvar="GLMCODE_REPLAY",
    help="Developer: play a scripted JSON list of completions instead of a model.")]

@dataclass
class RunFlags:
    """The flags every agent command shares."""

    model: str | None = None
    remote: str | None = None
    remote_model: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    approval: str | None = None
    yes: bool = False
    no_think: bool = False
    show_thinking: bool = False
    max_turns: int | None = None
    resume: str | None = None
    continue_last: bool = False
    repo: Path | None = None
    output_format: str = "text"
    replay: Path | None = None
    test_command: str | None = None

    def overrides(self) -> dict[str, Any]:
        return {
            "model": self.model, "remote": self.remote, "remote_model": self.remote_model,
            "device": self.device, "dtype": self.dtype, "quantization": self.quantization,
            "approval": self.approval, "max_turns": self.max_turns,
            "thinking": False if self.no_think else None,
            "show_thinking": True if self.show_thinking else None,
            "test_command": self.test_command,
        }

    def resume_id(self) -> str | None:
        if self.resume and self.continue_last:
            raise UsageError("use either --resume ID or --continue, not both")
        return "last" if self.continue_last else self.resume


def find_repo(explicit: Path | None) -> Path:
    """The repository to work in: --repo as given, else the git root around the cwd, else the cwd."""
    if explicit is not None:
        return explicit.resolve()
    cwd = Path.cwd().resolve()
    return next((d for d in (cwd, *cwd.parents) if (d / ".git").exists()), cwd)


def _check_output_format(value: str) -> str:
    if value not in OUTPUT_FORMATS:
        raise UsageError(f"--output-format must be one of {', '.join(OUTPUT_FORMATS)}, not {value!r}")
    return value


def _piped_stdin() -> str:
    if sys.stdin is None or sys.stdin.isatty():
        return ""
    return sys.stdin.read()


def _fenced(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text.rstrip(chr(10))}\n{fence}"


# --- running the agent once (ask, fix) ------------------------------------------------------------

def run_task(flags: RunFlags, prompt: str, *, command: str, read_only: bool, verify: bool) -> int:
    """Run the agent on one request to the end, render it, and return the exit code."""
    repo = find_repo(flags.repo)
    settings = load_settings(repo, flags.overrides())
    stats = RunStats(model=model_label(settings, flags.replay))
    renderer = make_renderer(flags.output_format, stats, show_thinking=settings.show_thinking)
    started = time.monotonic()
    try:
        backend = open_backend(settings, replay=flags.replay, show_progress=sys.stdout.isatty())
        try:
            report = _run_agent(flags, settings, repo, backend, renderer, prompt, command, read_only, verify)
        finally:
            backend.close()
    except GlmcodeError as error:  # the run could not start; JSON consumers still get a result
        if isinstance(renderer, JsonRenderer):
            renderer.finish(RunReport(status="error", exit_code=error.exit_code, result="", turns=0,
                                      duration_ms=_since(started), usage=usage_dict(), error=str(error)))
        raise
    report.duration_ms = _since(started)
    renderer.finish(report)
    return report.exit_code


def _since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _run_agent(flags: RunFlags, settings: Settings, repo: Path, backend: Any, renderer: Any,
               prompt: str, command: str, read_only: bool, verify: bool) -> RunReport:
    stats = renderer.stats
    stats.context_window = backend.context_window
    session = open_session(settings, repo, resume=flags.resume_id(), meta={"command": command})
    cancel = threading.Event()
    interactive = flags.output_format == "text" and sys.stdin.isatty() and sys.stdout.isatty()
    ask = _approval_callback(flags.yes, interactive, renderer, cancel)
    parts = build_agent(settings, backend, repo, read_only=read_only, ask=ask, on_event=renderer.event,
                        session=session)
    renderer.start({"session_id": session.id, "model": stats.model, "backend": backend_label(settings, flags.replay),
                    "repo": str(repo), "approval": "plan" if read_only else settings.approval,
                    "tools": [tool.name for tool in parts.tools], "version": __version__})
    with ctrl_c_cancels(cancel, on_first=lambda: print("\nstopping… (Ctrl-C again to quit)", file=sys.stderr)):
        result = parts.agent.run(prompt, cancel=cancel)
    status, error = result.status, describe_failure(result)
    tests = diff = None
    if verify:
        diff = parts.agent.checkpoints.diff()
        if status == "done":
            tests = run_tests(settings.test_command, repo, secrets=secrets_of(settings))
            if tests["command"] is not None and not tests["passed"]:
                status, error = "tests_failed", "the tests still fail"
    return RunReport(status=status, exit_code=exit_code_for(status, result.exception),
                     result=result.final_text or "", turns=result.turns, duration_ms=0,
                     usage=usage_dict(result.usage), session_id=session.id, error=error, tests=tests, diff=diff)


def _approval_callback(yes: bool, interactive: bool, renderer: Any, cancel: threading.Event) -> Any:
    """--yes approves; a person at a terminal is asked; otherwise nobody can answer (refused)."""
    if yes:
        return lambda request: True
    if interactive:
        return ApprovalPrompt(renderer, Console(), input, on_interrupt=cancel.set)
    return None


# --- commands ---------------------------------------------------------------------------------------

def interruptible(command: Callable[..., None]) -> Callable[..., None]:
    """Ctrl-C in a command becomes Interrupted (exit 130) instead of Click's "Aborted!" (exit 1)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted("interrupted") from None

    return run


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        print(f"glmcode {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())
        raise typer.Exit(0)


@app.command()
@interruptible
def ask(
    prompt: Annotated[str, typer.Argument(help="The question. Piped stdin is attached as context.")],
    model: ModelOpt = None, remote: RemoteOpt = None, remote_model: RemoteModelOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, quantization: QuantOpt = None,
    no_think: NoThinkOpt = False, show_thinking: ShowThinkingOpt = False, max_turns: MaxTurnsOpt = None,
    resume: ResumeOpt = None, continue_last: ContinueOpt = False, repo: RepoOpt = None,
    output_format: FormatOpt = "text", replay: ReplayOpt = None,
) -> None:
    """Answer one question with read-only tools: `git diff | glmcode ask "review this"`."""
    flags = RunFlags(model=model, remote=remote, remote_model=remote_model, device=device, dtype=dtype,
                     quantization=quantization, no_think=no_think, show_thinking=show_thinking,
                     max_turns=max_turns, resume=resume, continue_last=continue_last, repo=repo,
                     output_format=output_format, replay=replay)
    _check_output_format(output_format)
    attached = _piped_stdin()
    if attached.strip():
        prompt = f"{prompt}\n\nInput attached from stdin:\n{_fenced(attached)}"
    raise typer.Exit(run_task(flags, prompt, command="ask", read_only=True, verify=False))


FIX_PROMPT = (
    "Fix the following issue in this repository. Find the cause, make the smallest correct "
    "change, and run the tests to check it. Finish with a short summary of what you changed.\n\n"
    "Issue:\n{issue}"
)


@app.command()
@interruptible
def fix(
    issue: Annotated[str, typer.Argument(help="The issue: text, a file path, or - to read stdin.")],
    model: ModelOpt = None, remote: RemoteOpt = None, remote_model: RemoteModelOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, quantization: QuantOpt = None,
    approval: ApprovalOpt = None, yes: YesOpt = False, no_think: NoThinkOpt = False,
    show_thinking: ShowThinkingOpt = False, max_turns: MaxTurnsOpt = None,
    resume: ResumeOpt = None, continue_last: ContinueOpt = False, repo: RepoOpt = None,
    test_command: Annotated[
        str | None, typer.Option("--test-command", help="How to verify the fix (default: detected).")
    ] = None,
    output_format: FormatOpt = "text", replay: ReplayOpt = None,
) -> None:
    """Fix an issue end to end, run the tests to verify, print a summary and the diff (exit 5 if tests fail)."""
    flags = RunFlags(model=model, remote=remote, remote_model=remote_model, device=device, dtype=dtype,
                     quantization=quantization, approval=approval, yes=yes, no_think=no_think,
                     show_thinking=show_thinking, max_turns=max_turns, resume=resume,
                     continue_last=continue_last, repo=repo, output_format=output_format, replay=replay,
                     test_command=test_command)
    _check_output_format(output_format)
    text = _read_issue(issue)
    raise typer.Exit(run_task(flags, FIX_PROMPT.format(issue=text), command="fix", read_only=False, verify=True))


def _read_issue(issue: str) -> str:
    """The issue text: stdin for `-`, the file's contents if `issue` names a file, else `issue` itself."""
    if issue == "-":
        text = _piped_stdin()
        if not text.strip():
            raise UsageError("`glmcode fix -` reads the issue from stdin, but stdin is empty")
        return text
    if not issue.strip():
        raise UsageError("the issue is empty")
    path = Path(issue)
    if "\n" in issue or not _is_file(path):
        return issue
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise UsageError(f"cannot read the issue file {path}: {error.strerror}") from None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a one-line issue longer than a file name may be
        return False


@app.command()
@interruptible
def chat(
    model: ModelOpt = None, remote: RemoteOpt = None, remote_model: RemoteModelOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, quantization: QuantOpt = None,
    approval: ApprovalOpt = None, yes: YesOpt = False, no_think: NoThinkOpt = False,
    show_thinking: ShowThinkingOpt = False, max_turns: MaxTurnsOpt = None,
    resume: ResumeOpt = None, continue_last: ContinueOpt = False, repo: RepoOpt = None,
    replay: ReplayOpt = None,
) -> None:
    """Talk with the agent in this repository (the interactive REPL; /help lists commands)."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("`glmcode chat` needs a terminal; in scripts use `glmcode ask` or `glmcode fix`")
    flags = RunFlags(model=model, remote=remote, remote_model=remote_model, device=device, dtype=dtype,
                     quantization=quantization, approval=approval, yes=yes, no_think=no_think,
                     show_thinking=show_thinking, max_turns=max_turns, resume=resume,
                     continue_last=continue_last, repo=repo, replay=replay)
    from glmcode.repl import run_repl

    repo_root = find_repo(flags.repo)
    settings = load_settings(repo_root, flags.overrides())
    raise typer.Exit(run_repl(settings, repo_root, replay=flags.replay, resume=flags.resume_id(), yes=flags.yes))


@app.command()
@interruptible
def doctor(
    model: ModelOpt = None, repo: RepoOpt = None,
) -> None:
    """Check torch, CUDA, memory, the weights and the remote key; print the fix for each problem."""
    from glmcode.doctor import can_run_something, run_checks

    settings = load_settings(find_repo(repo), {"model": model})
    checks = run_checks(settings)
    for check in checks:
        print(check.line())
    if not can_run_something(checks):
        print("No model to run: get the weights (`glmcode model pull`) or set a remote API key.")
        raise typer.Exit(3)


@app.command()
@interruptible
def sessions(
    repo: RepoOpt = None,
    all_repos: Annotated[bool, typer.Option("--all", help="Sessions of every repo.")] = False,
) -> None:
    """List saved sessions (newest first), for --resume ID."""
    from glmcode.agent.session import SessionStore

    repo_root = find_repo(repo)
    settings = load_settings(repo_root, {})
    infos = SessionStore(settings.sessions_path()).list(repo=None if all_repos else str(repo_root))
    if not infos:
        print("no saved sessions" + ("" if all_repos else f" for {repo_root} (--all shows every repo)"))
    for info in infos:
        print(f"{info.id}  {info.created}  {' '.join(info.first_user_message.split())[:70]}")


# --- model ------------------------------------------------------------------------------------------

@model_app.command("info")
@interruptible
def model_info(
    path: Annotated[Path | None, typer.Argument(help="Checkpoint directory (default: the configured model).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Describe a checkpoint: architecture, sizes, shards, precision, and whether it is complete."""
    from glmcode.errors import CheckpointError

    model_dir = path or load_settings(find_repo(None), {}).model_dir()
    problems = checkpoint_problems(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir}: {'; '.join(problems) or 'no config.json'}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from None
    info = _describe_checkpoint(model_dir, config, problems)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>22}: {value if not isinstance(value, list) else '; '.join(value) or 'none'}")
    if problems:
        raise typer.Exit(3)


def _describe_checkpoint(model_dir: Path, config: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    index = model_dir / "model.safetensors.index.json"
    total_size = None
    if index.is_file():
        try:
            total_size = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        except ValueError:
            total_size = None
    shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
    size = total_size or sum((model_dir / name).stat().st_size for name in shards)
    keys = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "n_routed_experts", "num_experts_per_tok", "kv_lora_rank", "vocab_size", "max_position_embeddings",
            "torch_dtype", "dtype", "quantization_config")
    info: dict[str, Any] = {"path": str(model_dir)}
    info.update({key: config[key] for key in keys if key in config})
    info["weights"] = f"{size / 1e9:.2f} GB in {len(shards)} safetensors file(s)"
    info["problems"] = problems
    return info


HF_REPO_ID = "zai-org/GLM-4.7-Flash"


@model_app.command("pull")
@interruptible
def model_pull(
    target: Annotated[
        Path | None, typer.Option("--dir", help="Where to put the weights (default: the data dir).")
    ] = None,
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hugging Face repository.")] = HF_REPO_ID,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit.")] = None,
) -> None:
    """Download the weights from Hugging Face (resumes; needs the `pull` extra)."""
    path = pull_checkpoint(repo_id, target or default_model_dir(), revision=revision)
    print(f"weights ready at {path}")
    if target is not None:
        print(f"use them with --model {path} (or set model = \"{path}\" in the config)")


@model_app.command("quantize")
@interruptible
def model_quantize(
    source: Annotated[Path, typer.Argument(help="Checkpoint to read.")],
    destination: Annotated[Path, typer.Argument(help="Directory to write the quantized checkpoint to.")],
    bits: Annotated[int, typer.Option("--bits", help="Routed and shared experts: 4 or 8.")] = 4,
    linear_bits: Annotated[
        int, typer.Option("--linear-bits", help="Attention, dense MLP and lm_head: 8, or 4 for the fastest decode.")
    ] = 8,
) -> None:
    """Write a weight-only int4/int8 copy of a checkpoint (streams tensor by tensor, bounded memory)."""
    for name, value in (("--bits", bits), ("--linear-bits", linear_bits)):
        if value not in (4, 8):
            raise UsageError(f"{name} must be 4 or 8, not {value}")
    from glmcode.engine.quant.checkpoint import quantize_checkpoint

    written = quantize_checkpoint(source, destination, bits=bits, linear_bits=linear_bits, progress=sys.stderr.isatty())
    print(f"wrote an int{bits} checkpoint (int{linear_bits} elsewhere) to {written}; use it with --model {written}")


# --- config -----------------------------------------------------------------------------------------

@config_app.command("show")
@interruptible
def config_show(
    repo: RepoOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the merged configuration and where each value came from (secrets masked)."""
    repo_root = find_repo(repo)
    settings = load_settings(repo_root, {})
    rows = settings.shown()
    if as_json:
        print(json.dumps({key: {"value": value, "source": source} for key, value, source in rows}, indent=2))
        return
    for path in (user_config_path(), repo_config_path(repo_root)):
        print(f"# {path} ({'found' if path.is_file() else 'not found'})")
    console = Console(highlight=False)
    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    for column in ("key", "value", "source"):
        table.add_column(column, overflow="fold")
    for key, value, source in rows:
        table.add_row(key, value, source)
    console.print(table)


# --- entry point ------------------------------------------------------------------------------------

def normalize_remote_flag(args: list[str]) -> list[str]:
    """Give a bare `--remote` its default value (see the module docstring)."""
    result = []
    for position, arg in enumerate(args):
        if arg == "--":
            return result + args[position:]
        if arg == "--remote":
            following = args[position + 1] if position + 1 < len(args) else ""
            if following not in REMOTE_PRESETS and not re.match(r"https?://", following):
                arg = "--remote=zhipu"
        result.append(arg)
    return result


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every failure a user can cause ends as one line and its exit code.

    Typer reports its own usage errors (exit 2); GlmcodeError escapes the commands and is
    printed here.
    """
    args = normalize_remote_flag(sys.argv[1:] if argv is None else list(argv))
    try:
        app(args=args, prog_name="glmcode")
    except GlmcodeError as error:
        print(f"glmcode: {error}", file=sys.stderr)
        sys.exit(exit_code_for("error", error))
    except KeyboardInterrupt:
        print("glmcode: interrupted", file=sys.stderr)
        sys.exit(130)
