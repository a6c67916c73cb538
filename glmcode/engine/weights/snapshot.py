"""A quantized model kept on disk exactly as it sits in memory, mapped back by later loads.

A quantized load spends its time turning checkpoint tensors into what this machine's kernels
read (quantizing a float checkpoint, packing int4 / int8 tiles, stacking experts): about 2 s
per GB, over half a minute for the full model. The result depends only on the checkpoint, the
scheme and dtype, the kernels this CPU runs, torch and glmcode's engine code, so the first load
saves the built model under a fingerprint of all of those (torch's zip format) and every later
load maps that file instead. Mapping copies nothing: the model's tensors are the page cache's
pages, shared by every process that maps them and kept across runs while memory allows, and a
kernel with large folios maps them in 2 MB pages, as the decode kernels want. A warm load takes
about a second; a cold one reads the file at disk speed, with a progress bar.

Only glmcode's engine classes and torch's own modules may appear in a snapshot (torch's
weights-only unpickler, told no other names), so a foreign file cannot run code. A file that
fails to open (truncated, foreign, written by other code) gets one warning line, is deleted, and
the model is built from the checkpoint again. Tensor bytes are not checksummed at load (that
would read the whole file); files are written whole or not at all (a temporary file, renamed).
A read-only or full cache directory means no snapshot, never a failed load.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from glmcode.engine.cpu import kernels as cpu_kernels
from glmcode.engine.cpu.features import cpu_features
from glmcode.engine.disk_cache import free_bytes
from glmcode.engine.model import GlmMoeLite
from glmcode.engine.weights.progress import byte_progress

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUFFIX = ".model"
KEEP = 2  # snapshots kept in the directory (the newest); each is as large as the model
FREE_SPACE_MARGIN = 2 << 30  # a snapshot is written only if this much disk stays free after it
ABANDONED_AFTER_S = 600  # a temporary file untouched this long is left from an interrupted write
_TOUCH_CHUNK = 256 << 20
_ENGINE_SOURCES = Path(__file__).resolve().parent.parent  # glmcode/engine
_ALLOWED_MODULES = ("glmcode.engine.", "torch.nn.modules.")


def fingerprint(identity: dict) -> str:
    """What names one built model: the checkpoint and options in ``identity``, plus everything of
    this machine and install that changes the bytes a load builds from them."""
    machine = {
        "torch": torch.__version__, "cpu_features": cpu_features(), "cpu_kernels": cpu_kernels.available(),
        "engine_code": _engine_code_hash(), "format": FORMAT_VERSION,
    }  # fmt: skip
    text = json.dumps({**identity, **machine}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_or_build(directory: Path, identity: dict, build: Callable[[], GlmMoeLite], *, progress: bool) -> GlmMoeLite:
    """The model from its snapshot in ``directory``, else ``build()``'s, saved there for next time."""
    path = directory / f"{fingerprint(identity)}{SUFFIX}"
    if path.is_file():
        model = _map(path, progress)
        if model is not None:
            return model
    model = build()
    _save(model, path, progress)
    return model


def _map(path: Path, progress: bool) -> GlmMoeLite | None:
    try:
        with torch.serialization.safe_globals(_allowed_globals(path)):
            model = torch.load(path, mmap=True, weights_only=True)
        if not isinstance(model, GlmMoeLite):
            raise ValueError(f"it holds a {type(model).__name__}, not a model")
    except Exception as exc:  # truncated, foreign or stale: every such file is built again
        log.warning("glmcode: warning: ignoring the weights snapshot %s (%s); building the weights again", path, _first_line(exc))
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # the most recently used snapshots are the ones kept
    _touch(model, progress)
    return model.eval().requires_grad_(False)


def _allowed_globals(path: Path) -> list:
    """The classes the file names, each of which must be an engine class or a torch module."""
    classes = []
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)):
        module, _, attribute = name.rpartition(".")
        if not module.startswith(_ALLOWED_MODULES):
            raise ValueError(f"it names {name}, which a snapshot never holds")
        classes.append(getattr(importlib.import_module(module), attribute))
    return classes


def _touch(model: nn.Module, progress: bool) -> None:
    """Read one byte of every page up front, so a file not in the page cache is read now, at
    disk speed with a progress bar, rather than page by page during the first prefill."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in _tensors(model)}
    total = sum(s.nbytes() for s in storages.values())
    with byte_progress("mapping packed weights", total, enabled=progress) as advance:
        for storage in storages.values():
            raw = torch.tensor([], dtype=torch.uint8).set_(storage)
            for start in range(0, raw.numel(), _TOUCH_CHUNK):
                chunk = raw[start : start + _TOUCH_CHUNK]
                chunk[::4096].sum()
                advance(chunk.numel())


def _save(model: GlmMoeLite, path: Path, progress: bool) -> None:
    directory = path.parent
    nbytes = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in _tensors(model)}.values())
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _evict(directory, keep=KEEP - 1)
        free = free_bytes(directory)
        if free < nbytes + FREE_SPACE_MARGIN:
            log.warning("glmcode: warning: not saving the weights snapshot (%.1f GB needed, %.1f GB free in %s); the "
                        "next load builds the weights again", nbytes / 1e9, free / 1e9, directory)  # fmt: skip
            return
        if progress:
            print(f"glmcode: saving the packed weights ({nbytes / 1e9:.1f} GB) to {directory}, so later loads map them...",
                  file=sys.stderr, flush=True)  # fmt: skip
        started = time.perf_counter()
        with temporary.open("wb") as file:
            torch.save(model, file)
        os.replace(temporary, path)
        log.info("weights snapshot %s written in %.1f s", path.name, time.perf_counter() - started)
    except (OSError, RuntimeError) as exc:  # read-only, full, or gone (torch's writer raises RuntimeError)
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
        log.warning("glmcode: warning: cannot save the weights snapshot in %s (%s); the next load builds the weights "
                    "again", directory, reason)  # fmt: skip


def _evict(directory: Path, *, keep: int) -> None:
    """Delete all but the ``keep`` most recently used snapshots, and leftovers of interrupted writes."""
    for leftover in directory.glob(f"*{SUFFIX}.*.tmp"):
        if time.time() - leftover.stat().st_mtime > ABANDONED_AFTER_S:
            leftover.unlink(missing_ok=True)
    snapshots = sorted(directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in snapshots[keep:]:
        old.unlink(missing_ok=True)


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def _engine_code_hash() -> str:
    digest = hashlib.sha256()
    for source in sorted(_ENGINE_SOURCES.rglob("*")):
        if source.suffix in (".py", ".cpp", ".h"):
            digest.update(source.relative_to(_ENGINE_SOURCES).as_posix().encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
