"""The `glmcode` command: flags and commands only.

A command parses its arguments and hands over: `ask`, `fix` and `run` to glmcode.run, `chat` to
glmcode.repl, `acp` to glmcode.acp, the rest to the module that owns what they show (doctor,
weights, settings, glmcode.mcp.manage).

The flags the agent commands share are declared once (`RUN_OPTIONS`, one per `RunFlags` field);
`with_run_flags` adds the named ones to a command, which receives them as one `RunFlags`.

Exit codes (also in the README): 0 done, 1 error, 2 usage, 3 model or backend unavailable,
4 limit reached, 5 `fix` finished but the tests still fail, 130 interrupted.

`--remote` takes an optional value, which Typer cannot express, so `main` rewrites the
argument list first: a bare `--remote` becomes `--remote=zhipu` unless the next word is a
preset (`zhipu`, `zai`) or an http(s):// URL. That keeps `glmcode ask --remote "why?"` meaning
the prompt "why?" on the default remote.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from glmcode import __version__
from glmcode.cli_help import Command, Group
from glmcode.errors import GlmcodeError, Interrupted, UsageError
from glmcode.options import (
    APPROVAL_MODES, DTYPES, INT4, INT4_ALL, INT8, OUTPUT_FORMATS, REMOTE_PRESETS, SANDBOX_MODES, ZHIPU, choices,
)
from glmcode.run import RunFlags, ask_prompt, exit_code_for, fix_prompt, run_task
from glmcode.settings import default_model_dir, find_repo, load_settings, repo_config_path, user_config_path
from glmcode.weights import HF_REPO_ID, describe_checkpoint, pull_checkpoint

app = typer.Typer(
    name="glmcode",
    cls=Group,
    help="A coding assistant for GLM-4.7-Flash, local or remote.",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
model_app = typer.Typer(cls=Group, help="Inspect, download and quantize the model weights.")
config_app = typer.Typer(cls=Group, help="Show the configuration.")
mcp_app = typer.Typer(cls=Group, help="List, add, remove and test MCP servers (mcp_servers in the config).")
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")
app.add_typer(mcp_app, name="mcp")

# --- the flags the agent commands share ------------------------------------------------------------

_MODEL = "Model"
_AGENT = "Agent"


def _model_option(*names: str, help: str, **extra: Any) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=_MODEL, **extra)


def _agent_option(*names: str, help: str, **extra: Any) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=_AGENT, **extra)


ModelOpt = Annotated[str | None, _model_option("--model", metavar="DIR", help="Checkpoint directory (env GLMCODE_MODEL).")]
RepoOpt = Annotated[Path | None, typer.Option(
    "--repo", metavar="DIR", file_okay=False, exists=True,
    help="Repository to work in (default: the git root around the current directory).")]

# One entry per RunFlags field: its option, declared once for every command that takes it.
RUN_OPTIONS: dict[str, Any] = {
    "model": ModelOpt,
    "remote": Annotated[str | None, _model_option(
        "--remote", metavar=f"[{'|'.join(REMOTE_PRESETS)}|URL]",
        help=f"Use a hosted model: bare --remote = {ZHIPU}; or {choices(REMOTE_PRESETS[1:])}; "
             "or an OpenAI-compatible base URL.")],
    "remote_model": Annotated[str | None, _model_option("--remote-model", metavar="NAME", help="Model name for --remote.")],
    "device": Annotated[str | None, _model_option("--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps.")],
    "dtype": Annotated[str | None, _model_option("--dtype", metavar="DTYPE", help=f"{choices(DTYPES)}.")],
    "quantization": Annotated[str | None, _model_option(
        "--quantization", "-q", metavar="SCHEME", help=f"Weight-only: {INT4} (int4 experts, int8 elsewhere), {INT4_ALL} or {INT8}.")],
    "kv_cache_dir": Annotated[Path | None, _model_option(
        "--kv-cache-dir", metavar="DIR", file_okay=False,
        help="Where computed prompt prefixes are kept on disk (default: ~/.cache/glmcode/kv).")],
    "no_disk_cache": Annotated[bool, _model_option(
        "--no-disk-cache", help="Neither read nor write the disk caches (prompt prefixes, packed weights).")],
    "no_server": Annotated[bool, _model_option(
        "--no-server", help="Load the model in this process even when `glmcode serve` runs it.")],
    "approval": Annotated[str | None, _agent_option("--approval", "-a", metavar="MODE", help=f"{choices(APPROVAL_MODES)}.")],
    "yes": Annotated[bool, _agent_option("--yes", "-y", help="Approve everything the approval mode would ask about.")],
    "sandbox": Annotated[str | None, _agent_option(
        "--sandbox", metavar="MODE",
        help=f"OS sandbox for the commands the agent runs: {choices(SANDBOX_MODES)} (default: workspace-write "
             "for fix, --yes and yolo; off where you approve each command).")],
    "sandbox_network": Annotated[bool, _agent_option(
        "--sandbox-network", help="Let sandboxed commands use the network.")],
    "no_think": Annotated[bool, _agent_option("--no-think", help="Answer without thinking first.")],
    "show_thinking": Annotated[bool, _agent_option("--show-thinking", help="Show the model's thinking in full.")],
    "max_turns": Annotated[int | None, _agent_option("--max-turns", metavar="N", help="Most agent steps for this request.")],
    "resume": Annotated[str | None, _agent_option(
        "--resume", "-r", metavar="ID", help="Continue the saved session ID.")],
    "continue_last": Annotated[bool, _agent_option(
        "--continue", "-c", help="Continue the last session in this repo.")],
    "repo": RepoOpt,
    "test_command": Annotated[str | None, typer.Option(
        "--test-command", metavar="COMMAND", help="How to verify the fix (default: detected).")],
    "output_format": Annotated[str, typer.Option(
        "--output-format", "-o", metavar="FORMAT", help="text, json (one object at the end) or stream-json (one event per line).")],
    "replay": Annotated[Path | None, typer.Option(
        "--replay", hidden=True, envvar="GLMCODE_REPLAY",
        help="Developer: play a scripted JSON list of completions instead of a model.")],
}
_RUN_FLAG_DEFAULTS = {field.name: field.default for field in dataclasses.fields(RunFlags)}
assert set(RUN_OPTIONS) == set(_RUN_FLAG_DEFAULTS), "every RunFlags field needs its option"

ENGINE_FLAGS = ("model", "device", "dtype", "quantization", "kv_cache_dir", "no_disk_cache")
MODEL_FLAGS = (*ENGINE_FLAGS, "remote", "remote_model", "no_server")
APPROVAL_FLAGS = ("approval", "yes")
SANDBOX_FLAGS = ("sandbox", "sandbox_network")
SESSION_FLAGS = ("no_think", "show_thinking", "max_turns", "resume", "continue_last", "repo")


def with_run_flags(*names: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Add the named shared options to a command, which receives them as `flags: RunFlags`."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        own = [parameter for name, parameter in signature.parameters.items() if name != "flags"]
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=RUN_OPTIONS[name],
                                    default=_RUN_FLAG_DEFAULTS[name]) for name in names]

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> None:
            flags = RunFlags(**{name: kwargs.pop(name) for name in names})
            command(*args, flags=flags, **kwargs)

        parameters = own + shared
        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        return run

    return decorate


def _check_output_format(value: str) -> str:
    if value not in OUTPUT_FORMATS:
        raise UsageError(f"--output-format must be one of {', '.join(OUTPUT_FORMATS)}, not {value!r}")
    return value


def _piped_stdin() -> str:
    if sys.stdin is None or sys.stdin.isatty():
        return ""
    return sys.stdin.read()


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


@app.command(cls=Command)
@interruptible
@with_run_flags(*MODEL_FLAGS, *SANDBOX_FLAGS, *SESSION_FLAGS, "output_format", "replay")
def ask(
    prompt: Annotated[str, typer.Argument(help="The question. Piped stdin is attached as context.")],
    flags: RunFlags,
) -> None:
    """Answer one question with read-only tools: `git diff | glmcode ask "review this"`."""
    _check_output_format(flags.output_format)
    raise typer.Exit(run_task(flags, ask_prompt(prompt, _piped_stdin()), command="ask", read_only=True, verify=False))


@app.command(cls=Command)
@interruptible
@with_run_flags(*MODEL_FLAGS, *APPROVAL_FLAGS, *SANDBOX_FLAGS, *SESSION_FLAGS, "test_command", "output_format",
                "replay")
def fix(
    issue: Annotated[str, typer.Argument(help="The issue: text, a file path, or - to read stdin.")],
    flags: RunFlags,
) -> None:
    """Fix an issue end to end, run the tests to verify, print a summary and the diff (exit 5 if tests fail)."""
    _check_output_format(flags.output_format)
    raise typer.Exit(run_task(flags, fix_prompt(_read_issue(issue)), command="fix", read_only=False, verify=True))


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


@app.command(cls=Command)
@interruptible
@with_run_flags(*MODEL_FLAGS, *APPROVAL_FLAGS, *SANDBOX_FLAGS, *SESSION_FLAGS, "replay")
def chat(flags: RunFlags) -> None:
    """Talk with the agent in this repository (the interactive REPL; /help lists commands)."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("`glmcode chat` needs a terminal; in scripts use `glmcode ask` or `glmcode fix`")
    from glmcode.repl import run_repl

    repo_root = find_repo(flags.repo)
    settings = load_settings(repo_root, flags.overrides())
    raise typer.Exit(run_repl(settings, repo_root, replay=flags.replay, resume=flags.resume_id(), yes=flags.yes))


@app.command("run", cls=Command)
@interruptible
@with_run_flags(*MODEL_FLAGS, *APPROVAL_FLAGS, *SANDBOX_FLAGS, *SESSION_FLAGS, "output_format", "replay")
def run_command(
    name: Annotated[str, typer.Argument(help="The custom command: .glmcode/commands/NAME.md or the user's.")],
    arguments: Annotated[list[str] | None, typer.Argument(help="Its arguments ($ARGUMENTS, $1, $2...).")] = None,
    *,
    flags: RunFlags,
) -> None:
    """Run a custom command to the end, as a script would: `glmcode run review src/app.py --yes`."""
    from glmcode.custom_commands import load_commands
    from glmcode.repl import BUILTIN_NAMES

    _check_output_format(flags.output_format)
    words = list(arguments or [])
    command = load_commands(find_repo(flags.repo), builtins=BUILTIN_NAMES).require(name)
    prompt = command.render(" ".join(words), words)
    raise typer.Exit(run_task(flags, prompt, command="run", read_only=False, verify=False))


@app.command(cls=Command)
@interruptible
@with_run_flags(*MODEL_FLAGS, *APPROVAL_FLAGS, *SANDBOX_FLAGS, "no_think", "max_turns", "replay")
def acp(flags: RunFlags) -> None:
    """Serve the Agent Client Protocol on stdin/stdout, for Zed and other editors (sessions, diffs, approvals)."""
    import asyncio

    from glmcode.acp.agent import GlmcodeAcpAgent, serve, warn

    if sys.stdin.isatty():
        warn("serving the Agent Client Protocol on stdin/stdout; an editor runs this command "
             "(see the README's Editors section). Ctrl-C leaves.")
    asyncio.run(serve(GlmcodeAcpAgent(flags.overrides(), replay=flags.replay, yes=flags.yes)))


@app.command(cls=Command)
@interruptible
def doctor(
    model: ModelOpt = None, repo: RepoOpt = None,
) -> None:
    """Check torch, CUDA, memory, the weights, the remote key and the MCP servers; print the fix for each problem."""
    from glmcode.doctor import can_run_something, run_checks

    repo_root = find_repo(repo)
    settings = load_settings(repo_root, {"model": model})
    console = Console(highlight=False, soft_wrap=True)
    checks = []
    with console.status("checking…") as status:  # shown on a terminal only
        for check in run_checks(settings, repo=repo_root, progress=lambda what: status.update(f"{what}…")):
            console.print(check.line(), markup=False)
            checks.append(check)
    if not can_run_something(checks):
        print("No model to run: get the weights (`glmcode model pull`) or set a remote API key.")
        raise typer.Exit(3)


@app.command(cls=Command)
@interruptible
@with_run_flags(*ENGINE_FLAGS)
def serve(
    flags: RunFlags,
    host: Annotated[str, typer.Option("--host", metavar="HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="N", min=0, max=65535,
                                      help="Port to listen on (0: any free one).")] = 8321,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", metavar="KEY", envvar="GLMCODE_SERVE_API_KEY", show_envvar=False,
        help="Require this key from clients (env GLMCODE_SERVE_API_KEY); needed to bind beyond 127.0.0.1.")] = None,
    served_model_name: Annotated[str, typer.Option(
        "--served-model-name", metavar="NAME", help="The model name clients ask for.")] = "glm-4.7-flash",
    max_num_seqs: Annotated[int, typer.Option("--max-num-seqs", metavar="N", min=1,
                                              help="Requests decoded together.")] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", metavar="N", min=0,
                                           help="Requests waiting beyond those; more get HTTP 429.")] = 64,
    status: Annotated[bool, typer.Option("--status", help="List the running servers and exit.")] = False,
) -> None:
    """Keep the model loaded and serve the OpenAI chat API: chat, ask and fix use it (Ctrl-C stops)."""
    if status:
        from glmcode.server.status import print_status

        raise typer.Exit(print_status())
    from glmcode.server.main import ServeOptions
    from glmcode.server.main import serve as run_server

    settings = load_settings(find_repo(None), flags.overrides())
    options = ServeOptions(host=host, port=port, api_key=api_key or None, served_model_name=served_model_name,
                           max_num_seqs=max_num_seqs, max_queue=max_queue)  # fmt: skip
    raise typer.Exit(run_server(settings, options, show_progress=sys.stderr.isatty()))


@app.command(cls=Command)
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

@model_app.command("info", cls=Command)
@interruptible
def model_info(
    path: Annotated[Path | None, typer.Argument(help="Checkpoint directory (default: the configured model).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Describe a checkpoint: architecture, sizes, shards, precision, and whether it is complete."""
    info = describe_checkpoint(path or load_settings(find_repo(None), {}).model_dir())
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>22}: {value if not isinstance(value, list) else '; '.join(value) or 'none'}")
    if info["problems"]:
        raise typer.Exit(3)


@model_app.command("pull", cls=Command)
@interruptible
def model_pull(
    target: Annotated[
        Path | None, typer.Option("--dir", metavar="DIR", help="Where to put the weights (default: the data dir).")
    ] = None,
    repo_id: Annotated[str, typer.Option("--repo-id", metavar="REPO", help="Hugging Face repository.")] = HF_REPO_ID,
    revision: Annotated[str | None, typer.Option("--revision", metavar="REV", help="Branch, tag or commit.")] = None,
) -> None:
    """Download the weights from Hugging Face (resumes; needs the `pull` extra)."""
    path = pull_checkpoint(repo_id, target or default_model_dir(), revision=revision)
    print(f"weights ready at {path}")
    if target is not None:
        print(f"use them with --model {path} (or set model = \"{path}\" in the config)")


@model_app.command("quantize", cls=Command)
@interruptible
def model_quantize(
    source: Annotated[Path, typer.Argument(help="Checkpoint to read.")],
    destination: Annotated[Path, typer.Argument(help="Directory to write the quantized checkpoint to.")],
    bits: Annotated[int, typer.Option("--bits", metavar="4|8", help="Routed and shared experts: 4 or 8.")] = 4,
    linear_bits: Annotated[
        int, typer.Option("--linear-bits", metavar="4|8", help="Attention, dense MLP and lm_head: 8, or 4 for the fastest decode.")
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

@config_app.command("show", cls=Command)
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


# --- mcp --------------------------------------------------------------------------------------------

ScopeOpt = Annotated[str, typer.Option(
    "--scope", help="user (~/.config/glmcode/config.toml) or repo (.glmcode.toml of the repository).")]


@mcp_app.command("list", cls=Command)
@interruptible
def mcp_list(
    repo: RepoOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The configured MCP servers, where each is declared, what it runs (keys masked)."""
    from glmcode.mcp.manage import listing

    rows = listing(load_settings(find_repo(repo), {}))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no MCP servers configured; add one with `glmcode mcp add NAME -- COMMAND [ARGS...]`")
        return
    width = max(len(row["name"]) for row in rows)
    for row in rows:  # one line each, unwrapped, for grep as much as for eyes
        state = "" if row["enabled"] else " (disabled)"
        tools = "" if row["tools"] == "all" else f" tools: {', '.join(row['tools'])};"
        print(f"{row['name']:<{width}}  {row['transport']:<5}  {row['target']}{state}  [{tools} in {row['source']}]")


@mcp_app.command("add", cls=Command)
@interruptible
def mcp_add(
    name: Annotated[str, typer.Argument(help="A name for the server (its tools become mcp__NAME__TOOL).")],
    command: Annotated[list[str] | None, typer.Argument(
        help="After --: the command and its arguments (stdio).")] = None,
    url: Annotated[str | None, typer.Option("--url", help="A streamable HTTP server instead of a command.")] = None,
    env: Annotated[list[str] | None, typer.Option(
        "--env", "-e", help="KEY=VALUE for the server (VAR in braces after a $ reads the environment).")] = None,
    header: Annotated[list[str] | None, typer.Option(
        "--header", help="KEY=VALUE HTTP header (VAR in braces after a $ reads the environment).")] = None,
    tools: Annotated[str | None, typer.Option("--tools", help="Comma-separated tools to expose (default all).")] = None,
    trust_read_only: Annotated[bool, typer.Option(
        "--trust-read-only", help="Run its read-only tools without approval.")] = False,
    scope: ScopeOpt = "user",
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite a server of the same name.")] = False,
    repo: RepoOpt = None,
) -> None:
    """Declare an MCP server: `glmcode mcp add git -- mcp-server-git --repository .` or `--url URL`."""
    from glmcode.mcp.manage import add_server, config_file, parse_pairs

    if bool(command) == bool(url):
        raise UsageError("give the server's command after -- (stdio) or --url URL (HTTP), not both or neither")
    table: dict[str, Any] = {"url": url} if url else {"command": command[0], "args": command[1:]}
    if env:
        table["env"] = parse_pairs(env, "--env")
    if header:
        table["headers"] = parse_pairs(header, "--header")
    if tools:
        table["tools"] = [tool.strip() for tool in tools.split(",") if tool.strip()]
    if trust_read_only:
        table["trust_read_only"] = True
    path = config_file(scope, find_repo(repo))
    config = add_server(path, name, table, replace=replace)
    print(f"added MCP server {name} ({config.transport}: {config.target()}) to {path}; "
          f"check it with `glmcode mcp test {name}`")


@mcp_app.command("remove", cls=Command)
@interruptible
def mcp_remove(
    name: Annotated[str, typer.Argument(help="The server to remove.")],
    scope: Annotated[str | None, typer.Option(
        "--scope", help="user or repo (default: the one file that declares it).")] = None,
    repo: RepoOpt = None,
) -> None:
    """Delete [mcp_servers.NAME] from the config file that declares it."""
    from glmcode.mcp.manage import config_file, remove_server

    repo_root = find_repo(repo)
    paths = [config_file(scope, repo_root)] if scope else [user_config_path(), repo_config_path(repo_root)]
    print(f"removed MCP server {name} from {remove_server(paths, name)}")


@mcp_app.command("test", cls=Command)
@interruptible
def mcp_test(
    name: Annotated[str, typer.Argument(help="The server to start.")],
    repo: RepoOpt = None,
) -> None:
    """Start one MCP server, list its tools, stop it (exit 3 if it does not start)."""
    from glmcode.mcp.manage import test_server

    repo_root = find_repo(repo)
    for line in test_server(load_settings(repo_root, {}), repo_root, name, show_progress=sys.stderr.isatty()):
        print(line)


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
                arg = f"--remote={ZHIPU}"
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
