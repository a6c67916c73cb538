"""Quantized checkpoints on disk: the streaming converter, the integrity check, the reader.

Layout (a Hugging Face checkpoint directory with extra tensors per quantized weight):

- ``<base>.qweight`` int8 ``[N, K]`` (int8) or uint8 ``[N, K/2]`` (int4 nibbles),
  ``<base>.scales`` and, for int4, ``<base>.zeros``; ``<base>`` is the source name without
  ``.weight``. Every other tensor keeps its source name, dtype and values.
- ``model.safetensors.index.json`` maps tensors to shards; its metadata records each shard's
  size and CRC-32.
- ``config.json`` gains ``quantization_config`` (method, format version, bits per class, group
  size). It is written last, and the whole directory is built under a temporary name and renamed
  into place, so a directory that looks complete is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from glmcode.engine.quant.formats import (
    Int4Weight,
    Int8Weight,
    QuantizedWeight,
    QuantScheme,
    int4_group_size,
    quantize,
)
from glmcode.engine.weights.layout import INDEX_FILE, read_index
from glmcode.engine.weights.progress import byte_progress
from glmcode.engine.weights.safetensors import SafetensorsFile, checkpoint_files, file_crc32, open_shards, read_header
from glmcode.errors import CheckpointError, UsageError

QUANT_METHOD = "glmcode"
FORMAT_VERSION = 1
DEFAULT_SHARD_BYTES = 1 << 30
_ROWS_PER_CHUNK = 8192  # rows quantized at once: bounds memory for the 154880-row lm_head

# ---------------------------------------------------------------------------------------------
# Writing: shards of bounded size, then index and config, then one rename


class _ShardWriter:
    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shard_tensors: list[list[str]] = []
        self.shard_stats: list[dict] = []

    def add(self, group: dict[str, torch.Tensor]) -> None:
        """Add tensors that belong together (a weight and its scales): they share a shard."""
        size = sum(t.numel() * t.element_size() for t in group.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.update({name: t.contiguous() for name, t in group.items()})
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.directory / f"shard-{len(self.shard_tensors):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shard_tensors.append(list(self.pending))
        self.shard_stats.append({"size": path.stat().st_size, "crc32": file_crc32(path)})
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> dict:
        """Name the shards ``model-0000i-of-0000n.safetensors``; return the index dict."""
        self.flush()
        total = len(self.shard_tensors)
        weight_map, shards = {}, {}
        for i, (names, stats) in enumerate(zip(self.shard_tensors, self.shard_stats)):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.directory / f"shard-{i:05d}.tmp", self.directory / final)
            weight_map.update({name: final for name in names})
            shards[final] = stats
        total_size = sum(s["size"] for s in shards.values())
        return {"metadata": {"total_size": total_size, "shards": shards}, "weight_map": weight_map}


def quantize_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    bits: int = 4,
    *,
    linear_bits: int = 8,
    group_size: int = 128,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Convert a float Hugging Face checkpoint into a quantized one, one tensor at a time.

    ``bits`` applies to routed and shared experts, ``linear_bits`` to the other projections.
    Memory stays bounded by ``shard_bytes`` plus one block of rows, whatever the model size.
    """
    src = Path(src_dir)
    if bits not in (4, 8) or linear_bits not in (4, 8):
        raise UsageError(f"--bits must be 4 or 8 (got experts {bits}, linear {linear_bits})")
    config = _read_config(src)
    if "quantization_config" in config:
        raise UsageError(f"{src} is already quantized; quantize the original float checkpoint")
    scheme = QuantScheme(expert_bits=bits, linear_bits=linear_bits, group_size=group_size)
    files = checkpoint_files(src)
    shards = open_shards(files)
    ordered = sorted(files, key=lambda n: (files[n], shards[files[n]].header[n]["data_offsets"][0]))

    def converted() -> Iterator[dict[str, torch.Tensor]]:
        total_bytes = sum(shards[files[n]].nbytes(n) for n in ordered)
        with byte_progress(f"quantizing to int{bits}", total_bytes, enabled=progress) as advance:
            for name in ordered:
                source = shards[files[name]]
                yield _convert_tensor(name, source, scheme)
                advance(source.nbytes(name))

    return write_quantized_checkpoint(dst_dir, config, scheme, converted(), side_files=src, shard_bytes=shard_bytes)


def write_quantized_checkpoint(
    dst_dir: str | os.PathLike, config: dict, scheme: QuantScheme, groups: Iterable[dict[str, torch.Tensor]], *,
    side_files: Path | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:  # fmt: skip
    """Write a quantized checkpoint: ``groups`` of on-disk tensors (a weight with its scales share a
    shard), then the index, the tokenizer and other files of ``side_files``, then the config."""
    dst = Path(dst_dir)
    if dst.exists() and any(dst.iterdir()):
        raise UsageError(f"{dst} already exists and is not empty; remove it or pick another directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        writer = _ShardWriter(work, shard_bytes)
        for group in groups:
            writer.add(group)
        index = writer.finish()
        if side_files is not None:
            _copy_side_files(side_files, work)
        (work / INDEX_FILE).write_text(json.dumps(index, indent=2))
        config = {**config, "quantization_config": {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
                                                    **scheme.to_dict()}}  # fmt: skip
        (work / "config.json").write_text(json.dumps(config, indent=2))
        if dst.exists():
            dst.rmdir()
        os.replace(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dst


def _convert_tensor(name: str, source: SafetensorsFile, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    shape = source.shape(name)
    bits = scheme.bits_for(name, shape)
    if bits is None:
        return {name: source.read(name)}
    blocks = [
        quantize(source.read(name, rows=(start, min(start + _ROWS_PER_CHUNK, shape[0]))), bits, scheme.group_size)
        for start in range(0, shape[0], _ROWS_PER_CHUNK)
    ]
    return quantized_tensors(name, blocks)


def quantized_tensors(name: str, blocks: list[QuantizedWeight]) -> dict[str, torch.Tensor]:
    """The on-disk tensors of the weight ``name``, quantized in row blocks."""
    base = name.removesuffix(".weight")
    return {f"{base}.{suffix}": tensor for suffix, tensor in _stored_parts(blocks).items()}


def _stored_parts(blocks: list[QuantizedWeight]) -> dict[str, torch.Tensor]:
    if isinstance(blocks[0], Int8Weight):
        return {
            "qweight": torch.cat([b.values for b in blocks]),
            "scales": torch.cat([b.scales for b in blocks]),
        }
    return {
        "qweight": torch.cat([b.nibbles for b in blocks]),
        "scales": torch.cat([b.scales for b in blocks]),
        "zeros": torch.cat([b.zeros for b in blocks]),
    }


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, chat template, generation config: everything but weights, index and config."""
    for path in src.iterdir():
        skip = path.suffix == ".safetensors" or path.name in (INDEX_FILE, "config.json")
        if path.is_file() and not skip:
            shutil.copy2(path, dst / path.name)


# ---------------------------------------------------------------------------------------------
# Loading


def quantization_config(model_dir: str | os.PathLike) -> dict | None:
    """The ``quantization_config`` of a glmcode-quantized checkpoint, or None for a float one."""
    section = _read_config(Path(model_dir)).get("quantization_config")
    if section is None:
        return None
    if section.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(
            f"{model_dir} uses quantization {section.get('quant_method')!r}; glmcode reads only its own "
            f"('glmcode model quantize' the float checkpoint)"
        )
    if section.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{model_dir} has quantized format version {section.get('format_version')}, this glmcode reads "
            f"{FORMAT_VERSION}; re-quantize it"
        )
    return section


def verify_quantized_checkpoint(model_dir: str | os.PathLike, *, checksums: bool = False) -> None:
    """Raise CheckpointError unless every shard is present, whole and matches the index.

    Always checks sizes, headers and tensor names (cheap; catches truncated and half-written
    files); ``checksums=True`` also reads every byte and compares CRC-32s (catches bit rot).
    """
    model_dir = Path(model_dir)
    if quantization_config(model_dir) is None:
        raise CheckpointError(f"{model_dir} is not a quantized checkpoint (no quantization_config)")
    index = read_index(model_dir / INDEX_FILE)
    recorded = index.get("metadata", {}).get("shards", {})
    names_by_shard: dict[str, set[str]] = {}
    for name, shard in index["weight_map"].items():
        names_by_shard.setdefault(shard, set()).add(name)
    for shard, names in names_by_shard.items():
        path = model_dir / shard
        stats = recorded.get(shard)
        if stats is None:
            raise CheckpointError(f"{model_dir}/{INDEX_FILE} does not describe {shard}; re-quantize the checkpoint")
        if not path.exists():
            raise CheckpointError(f"{path} is missing; re-quantize the checkpoint")
        if path.stat().st_size != stats["size"]:
            raise CheckpointError(
                f"{path} has {path.stat().st_size} bytes, expected {stats['size']} (truncated or "
                f"overwritten); re-quantize the checkpoint"
            )
        missing = names - set(read_header(path))
        if missing:
            raise CheckpointError(f"{path} lacks {len(missing)} tensors, e.g. {min(missing)}; re-quantize the checkpoint")
        if checksums and file_crc32(path) != stats["crc32"]:
            raise CheckpointError(f"{path} is corrupted (checksum mismatch); re-quantize the checkpoint")


_QUANT_SUFFIX = re.compile(r"\.(qweight|scales|zeros)$")


def iter_checkpoint_weights(
    model_dir: str | os.PathLike,
    scheme: QuantScheme | None = None,
    *,
    keep: Callable[[str], bool] = lambda name: True,
    advance: Callable[[int], None] = lambda nbytes: None,
) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """Every weight of a checkpoint that `keep(name)` wants, under its source name, quantized
    where it should be; `advance(nbytes)` hears of every byte read (for a progress bar).

    A quantized checkpoint yields ``Int8Weight`` / ``Int4Weight`` for its quantized tensors
    (after :func:`verify_quantized_checkpoint`). A float checkpoint with a ``scheme`` is
    quantized on the fly, one tensor at a time; without one it yields plain tensors.
    """
    model_dir = Path(model_dir)
    section = quantization_config(model_dir)
    if section is not None:
        verify_quantized_checkpoint(model_dir)
    for source in open_shards(checkpoint_files(model_dir)).values():
        names = source.names()
        for name in names:
            if section is not None:
                match = _QUANT_SUFFIX.search(name)
                if match is not None and match.group(1) != "qweight":
                    continue  # read with its qweight
                if match is not None:
                    base = name[: match.start()]
                    if keep(f"{base}.weight"):
                        parts = [f"{base}.{suffix}" for suffix in ("qweight", "scales", "zeros") if f"{base}.{suffix}" in names]
                        advance(sum(source.nbytes(part) for part in parts))
                        yield f"{base}.weight", _read_quantized(source, base, names, section)
                    continue
            if not keep(name):
                continue
            bits = scheme.bits_for(name, source.shape(name)) if scheme is not None and section is None else None
            tensor = source.read(name)
            advance(source.nbytes(name))
            yield name, tensor if bits is None else quantize(tensor, bits, scheme.group_size)


def checkpoint_bytes(model_dir: str | os.PathLike, keep: Callable[[str], bool] = lambda name: True) -> int:
    """The bytes iter_checkpoint_weights reads for the tensors `keep` wants."""
    total = 0
    for source in open_shards(checkpoint_files(model_dir)).values():
        for name in source.names():
            match = _QUANT_SUFFIX.search(name)
            if keep(name if match is None else name[: match.start()] + ".weight"):
                total += source.nbytes(name)
    return total


def _read_quantized(source: SafetensorsFile, base: str, names: list[str], section: dict) -> QuantizedWeight:
    if f"{base}.scales" not in names:
        raise CheckpointError(f"{source.path} has {base}.qweight without its scales; re-quantize the checkpoint")
    qweight, scales = source.read(f"{base}.qweight"), source.read(f"{base}.scales")
    if qweight.dtype == torch.int8:
        return Int8Weight(values=qweight, scales=scales)
    zeros = source.read(f"{base}.zeros")
    group_size = (qweight.shape[1] * 2) // scales.shape[1]
    if group_size != int4_group_size(qweight.shape[1] * 2, section["group_size"]):
        raise CheckpointError(f"{source.path}: {base} has an unexpected int4 group size {group_size}")
    return Int4Weight(nibbles=qweight, scales=scales, zeros=zeros, group_size=group_size)


def _read_config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {model_dir / 'config.json'} ({exc})") from exc
