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
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import nullcontext
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
from glmcode.errors import CheckpointError, UsageError

QUANT_METHOD = "glmcode"
FORMAT_VERSION = 1
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 1 << 30
_ROWS_PER_CHUNK = 8192  # rows quantized at once: bounds memory for the 154880-row lm_head
_CRC_BLOCK = 16 << 20

_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


# ---------------------------------------------------------------------------------------------
# Reading safetensors without mapping whole shards (bounded memory on any checkpoint size)


class SafetensorsFile:
    """One .safetensors file read tensor by tensor (or row range by row range) with pread."""

    def __init__(self, path: Path):
        self.path = path
        self.header = read_safetensors_header(path)
        self._data_start = 8 + struct.unpack("<Q", path.open("rb").read(8))[0]

    def names(self) -> list[str]:
        return [name for name in self.header if name != "__metadata__"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor ``name``, or only rows ``[start, stop)`` of its first dimension."""
        info = self.header[name]
        dtype, shape = _DTYPES[info["dtype"]], list(info["shape"])
        begin, end = info["data_offsets"]
        if rows is not None:
            row_bytes = (end - begin) // max(shape[0], 1)
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape[0] = rows[1] - rows[0]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with self.path.open("rb", buffering=0) as f:
            f.seek(self._data_start + begin)
            if f.readinto(buffer.numpy()) != end - begin:
                raise CheckpointError(f"{self.path} is truncated (tensor {name}); re-download or re-quantize it")
        return buffer.view(dtype).reshape(shape)


def read_safetensors_header(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > path.stat().st_size - 8:
                raise ValueError("header longer than the file")
            return json.loads(f.read(length))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); re-create it") from exc


def checkpoint_shards(model_dir: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index or the single ``model.safetensors``."""
    index = model_dir / INDEX_FILE
    if index.exists():
        return dict(_read_json(index)["weight_map"])
    single = model_dir / "model.safetensors"
    if single.exists():
        return {name: single.name for name in SafetensorsFile(single).names()}
    raise CheckpointError(f"{model_dir} has no {INDEX_FILE} or model.safetensors")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} ({exc})") from exc


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


def file_crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(_CRC_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


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
    src, dst = Path(src_dir), Path(dst_dir)
    if bits not in (4, 8) or linear_bits not in (4, 8):
        raise UsageError(f"--bits must be 4 or 8 (got experts {bits}, linear {linear_bits})")
    config = _read_json(src / "config.json")
    if "quantization_config" in config:
        raise UsageError(f"{src} is already quantized; quantize the original float checkpoint")
    if dst.exists() and any(dst.iterdir()):
        raise UsageError(f"{dst} already exists and is not empty; remove it or pick another directory")
    scheme = QuantScheme(expert_bits=bits, linear_bits=linear_bits, group_size=group_size)
    shards = checkpoint_shards(src)

    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        writer = _ShardWriter(work, shard_bytes)
        files = {name: SafetensorsFile(src / name) for name in sorted(set(shards.values()))}
        ordered = sorted(shards, key=lambda n: (shards[n], files[shards[n]].header[n]["data_offsets"][0]))
        total_bytes = sum(_tensor_bytes(files[shards[n]].header[n]) for n in ordered)
        with _progress_bar(progress, total_bytes, f"quantizing to int{bits}") as advance:
            for name in ordered:
                source = files[shards[name]]
                _convert_tensor(name, source, scheme, writer)
                advance(_tensor_bytes(source.header[name]))
        index = writer.finish()
        _copy_side_files(src, work)
        (work / INDEX_FILE).write_text(json.dumps(index, indent=2))
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            **scheme.to_dict(),
        }
        (work / "config.json").write_text(json.dumps(config, indent=2))
        if dst.exists():
            dst.rmdir()
        os.replace(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dst


def _convert_tensor(name: str, source: SafetensorsFile, scheme: QuantScheme, writer: _ShardWriter) -> None:
    shape = source.shape(name)
    bits = scheme.bits_for(name, shape)
    if bits is None:
        writer.add({name: source.read(name)})
        return
    blocks = [
        quantize(source.read(name, rows=(start, min(start + _ROWS_PER_CHUNK, shape[0]))), bits, scheme.group_size)
        for start in range(0, shape[0], _ROWS_PER_CHUNK)
    ]
    base = name.removesuffix(".weight")
    writer.add({f"{base}.{suffix}": tensor for suffix, tensor in quantized_tensors(blocks).items()})


def quantized_tensors(blocks: list[QuantizedWeight]) -> dict[str, torch.Tensor]:
    """The on-disk tensors of a weight quantized in row blocks."""
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


def _tensor_bytes(info: dict) -> int:
    begin, end = info["data_offsets"]
    return end - begin


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, chat template, generation config: everything but weights, index and config."""
    for path in src.iterdir():
        skip = path.suffix == ".safetensors" or path.name in (INDEX_FILE, "config.json")
        if path.is_file() and not skip:
            shutil.copy2(path, dst / path.name)


def _progress_bar(enabled: bool, total: int, description: str):
    if not enabled:
        return nullcontext(lambda _: None)
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    class _Bar:
        def __enter__(self):
            self.progress = Progress(
                "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn()
            )
            self.progress.__enter__()
            task = self.progress.add_task(description, total=total)
            return lambda n: self.progress.advance(task, n)

        def __exit__(self, *exc):
            return self.progress.__exit__(*exc)

    return _Bar()


# ---------------------------------------------------------------------------------------------
# Loading


def quantization_config(model_dir: str | os.PathLike) -> dict | None:
    """The ``quantization_config`` of a glmcode-quantized checkpoint, or None for a float one."""
    config = _read_json(Path(model_dir) / "config.json")
    section = config.get("quantization_config")
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
    index = _read_json(model_dir / INDEX_FILE)
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
        missing = names - set(read_safetensors_header(path))
        if missing:
            raise CheckpointError(f"{path} lacks {len(missing)} tensors, e.g. {min(missing)}; re-quantize the checkpoint")
        if checksums and file_crc32(path) != stats["crc32"]:
            raise CheckpointError(f"{path} is corrupted (checksum mismatch); re-quantize the checkpoint")


_QUANT_SUFFIX = re.compile(r"\.(qweight|scales|zeros)$")


def iter_checkpoint_weights(
    model_dir: str | os.PathLike, scheme: QuantScheme | None = None
) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """Every weight of a checkpoint under its source name, quantized where it should be.

    A quantized checkpoint yields ``Int8Weight`` / ``Int4Weight`` for its quantized tensors
    (after :func:`verify_quantized_checkpoint`). A float checkpoint with a ``scheme`` is
    quantized on the fly, one tensor at a time; without one it yields plain tensors.
    """
    model_dir = Path(model_dir)
    section = quantization_config(model_dir)
    if section is not None:
        verify_quantized_checkpoint(model_dir)
        yield from _iter_quantized(model_dir, section)
        return
    shards = checkpoint_shards(model_dir)
    for shard in sorted(set(shards.values())):
        source = SafetensorsFile(model_dir / shard)
        for name in source.names():
            bits = scheme.bits_for(name, source.shape(name)) if scheme else None
            tensor = source.read(name)
            yield name, tensor if bits is None else quantize(tensor, bits, scheme.group_size)


def _iter_quantized(model_dir: Path, section: dict) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    shards = checkpoint_shards(model_dir)
    for shard in sorted(set(shards.values())):
        source = SafetensorsFile(model_dir / shard)
        names = source.names()
        for name in names:
            match = _QUANT_SUFFIX.search(name)
            if match is None:
                yield name, source.read(name)
            elif match.group(1) == "qweight":
                base = name[: match.start()]
                yield f"{base}.weight", _read_quantized(source, base, names, section)


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
