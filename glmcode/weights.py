"""The model weights on disk: is a checkpoint directory usable, and downloading one.

Nothing here downloads unless the user runs `glmcode model pull`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from glmcode.engine.weights.layout import INDEX_FILE, read_index
from glmcode.errors import BackendUnavailable, CheckpointError, GlmcodeError, Interrupted
from glmcode.settings import Settings

HF_REPO_ID = "zai-org/GLM-4.7-Flash"

# Files a checkpoint needs besides the weights; the engine reads these.
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.py", "*.md"]


def no_weights_message(model_dir: Path) -> str:
    return (
        f"no GLM-4.7-Flash weights found at {model_dir}. Download them with `glmcode model pull` "
        "(about 60 GB), point --model or GLMCODE_MODEL at a checkpoint directory, "
        "or use the hosted model with --remote (needs ZHIPUAI_API_KEY, or --remote zai with ZAI_API_KEY)."
    )


# --- checkpoints -------------------------------------------------------------------------------

def checkpoint_problems(model_dir: Path) -> list[str]:
    """What is missing or broken in a Hugging Face-layout checkpoint directory (empty = usable)."""
    if not model_dir.is_dir():
        return ["not a directory"]
    problems = [f"missing {name}" for name in ("config.json", "tokenizer.json") if not (model_dir / name).is_file()]
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            shards = set(read_index(index_path)["weight_map"].values())
        except CheckpointError:
            return problems + [f"{index_path.name} is not a valid safetensors index"]
        missing = sorted(shard for shard in shards if not (model_dir / shard).is_file())
        if missing:
            problems.append(f"{len(missing)} of {len(shards)} weight shards missing (first: {missing[0]})")
    elif not any(model_dir.glob("*.safetensors")):
        problems.append("no *.safetensors weights")
    return problems


def describe_checkpoint(model_dir: Path) -> dict[str, Any]:
    """What `glmcode model info` shows: architecture, sizes, shards, precision, and the problems."""
    require_weights_directory(model_dir)
    problems = checkpoint_problems(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir}: {'; '.join(problems) or 'no config.json'}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from None
    index = model_dir / INDEX_FILE
    total_size = None
    if index.is_file():
        try:
            total_size = read_index(index).get("metadata", {}).get("total_size")
        except CheckpointError:
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


def require_weights_directory(model_dir: Path) -> None:
    """Raise the one-line error for a model path with no weights at all, or one that is a file."""
    if not model_dir.exists() or (model_dir.is_dir() and not any(model_dir.iterdir())):
        raise BackendUnavailable(no_weights_message(model_dir))
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a directory: --model takes a checkpoint directory")


def require_checkpoint(settings: Settings) -> Path:
    """The configured checkpoint directory, if it is complete; else the error that says what to do."""
    model_dir = settings.model_dir()
    require_weights_directory(model_dir)
    problems = checkpoint_problems(model_dir)
    if problems:
        raise CheckpointError(f"{model_dir} is not a usable checkpoint: {'; '.join(problems)}")
    return model_dir


def pull_checkpoint(repo_id: str, target: Path, *, revision: str | None = None) -> Path:
    """Download (or resume downloading) a checkpoint from Hugging Face into `target`."""
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        raise GlmcodeError('`glmcode model pull` needs huggingface_hub: pip install "glmcode[pull]"') from None
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        needed = sum(sibling.size or 0 for sibling in info.siblings or []
                     if not (target / sibling.rfilename).is_file())
        _check_disk_space(target, needed)
        snapshot_download(repo_id, revision=revision, local_dir=str(target), allow_patterns=_WEIGHT_PATTERNS)
    except KeyboardInterrupt:
        raise Interrupted("download interrupted; run `glmcode model pull` again to resume") from None
    except GlmcodeError:
        raise
    except Exception as error:  # noqa: BLE001 - network, auth, offline mode: all end the same way
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise BackendUnavailable(
            f"cannot download {repo_id} from Hugging Face ({reason}). Check the network (and that "
            "HF_HUB_OFFLINE is unset), or copy a downloaded checkpoint here and pass --model DIR, "
            "or use --remote."
        ) from None
    problems = checkpoint_problems(target)
    if problems:
        raise CheckpointError(f"download finished but {target} is incomplete: {'; '.join(problems)}")
    return target


def _check_disk_space(target: Path, needed: int) -> None:
    existing = next(p for p in (target, *target.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise GlmcodeError(
            f"not enough disk space in {existing}: the download needs {needed / 1e9:.1f} GB, "
            f"{free / 1e9:.1f} GB free; free some space or pass --dir on a bigger disk"
        )
