"""The names a user can pass for glmcode's multiple-choice options, defined once.

A leaf module (standard library only, no torch): settings, the CLI, doctor, the console and the
engine all read their choices from here, so a new name is added in one place.
"""

from __future__ import annotations

from enum import Enum

# Weight-only quantization schemes (`--quantization`, setting `quantization`).
INT4 = "int4"  # int4 experts, int8 everywhere else: the quality choice
INT4_ALL = "int4-all"  # int4 everywhere: fewer bytes per token, the fastest decode
INT8 = "int8"  # int8 everywhere
QUANTIZATIONS = (INT4, INT4_ALL, INT8)

# Latent KV cache storage other than the model dtype (setting `kv_cache_dtype`): int8 (CPU), fp8 (CUDA).
KV_CACHE_DTYPES = ("int8", "fp8")

# Floating-point weight types (`--dtype`).
DTYPES = ("float32", "bfloat16", "float16")


class ApprovalMode(str, Enum):
    """What needs the user's approval (`--approval`, `/mode`)."""

    PLAN = "plan"  # read-only: nothing is changed or run
    ASK = "ask"  # ask before every edit and every command
    AUTO_EDIT = "auto-edit"  # edit freely, ask before commands
    YOLO = "yolo"  # ask nothing (deny rules still apply)


APPROVAL_MODES = tuple(mode.value for mode in ApprovalMode)

# The OS sandbox for the commands the agent runs (`--sandbox`, setting `sandbox`).
SANDBOX_READ_ONLY = "read-only"  # nothing writable, the repository included
SANDBOX_WORKSPACE_WRITE = "workspace-write"  # only the repository is writable
SANDBOX_OFF = "off"  # no sandbox: commands run with the user's full rights
SANDBOX_MODES = (SANDBOX_READ_ONLY, SANDBOX_WORKSPACE_WRITE, SANDBOX_OFF)

# `--output-format` of `ask` and `fix`.
OUTPUT_FORMATS = ("text", "json", "stream-json")
JSON_FORMATS = ("json", "stream-json")

# Hosted APIs `--remote` knows by name (besides an http(s):// base URL); a bare `--remote` is Zhipu.
ZHIPU = "zhipu"  # open.bigmodel.cn
ZAI = "zai"  # api.z.ai
REMOTE_PRESETS = (ZHIPU, ZAI)


def choices(names: tuple[str, ...]) -> str:
    """"a, b or c", for help texts and error messages."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
