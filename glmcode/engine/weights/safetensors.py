"""Reading safetensors checkpoints tensor by tensor, in bounded memory, with clear errors.

A shard is never mapped whole: each tensor (or a range of its rows) is read with one positioned
read into a fresh buffer, so loading or converting a 60 GB checkpoint needs memory for one
tensor at a time. Every way a checkpoint can be broken (a missing or invalid index, a shard the
index names but the disk lacks, a truncated file, a tensor the index lists but the shard lacks)
is a CheckpointError naming the file and the tensor.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import torch

from glmcode.engine.weights.layout import INDEX_FILE, SINGLE_FILE, read_index
from glmcode.errors import CheckpointError

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
_CRC_BLOCK = 16 << 20


class SafetensorsFile:
    """One .safetensors file read tensor by tensor (or row range by row range)."""

    def __init__(self, path: Path):
        self.path = path
        self.header, self._data_start = _read_header(path)

    def names(self) -> list[str]:
        return [name for name in self.header if name != "__metadata__"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def nbytes(self, name: str) -> int:
        begin, end = self.header[name]["data_offsets"]
        return end - begin

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `name`, or only rows [start, stop) of its first dimension."""
        info = self.header.get(name)
        if info is None:
            raise CheckpointError(f"{self.path.name}: tensor {name} is listed in the index but missing")
        dtype, shape = _DTYPES.get(info["dtype"]), list(info["shape"])
        if dtype is None:
            raise CheckpointError(f"{self.path.name}: tensor {name} has an unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if rows is not None:
            row_bytes = (end - begin) // max(shape[0], 1)
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape[0] = rows[1] - rows[0]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with self.path.open("rb", buffering=0) as f:
            f.seek(self._data_start + begin)
            if f.readinto(buffer.numpy()) != end - begin:
                raise CheckpointError(f"{self.path.name} is truncated (tensor {name}); download or quantize it again")
        return buffer.view(dtype).reshape(shape)


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data offsets)."""
    return _read_header(path)[0]


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > path.stat().st_size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        data_size = path.stat().st_size - 8 - length
        ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
        if ends and max(ends) > data_size:
            raise ValueError(f"its tensors need {max(ends)} bytes of data, the file holds {data_size}")
    except (OSError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path.name} is not a readable safetensors file (truncated?): {exc}") from None
    return header, 8 + length


def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index or from a single model.safetensors."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = read_index(index_path)["weight_map"]
        files = {}
        for file_name in set(weight_map.values()):
            path = model_dir / file_name
            if not path.is_file():
                raise CheckpointError(f"{index_path.name} refers to {file_name}, which does not exist")
            files[file_name] = path
        return {name: files[file_name] for name, file_name in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return {name: single for name in SafetensorsFile(single).names()}
    raise CheckpointError(f"{model_dir}: no {INDEX_FILE} or {SINGLE_FILE}; not a safetensors checkpoint")


def open_shards(files: dict[str, Path]) -> dict[Path, SafetensorsFile]:
    """Each distinct shard of a checkpoint_files() map, opened once."""
    return {path: SafetensorsFile(path) for path in sorted(set(files.values()))}


def file_crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(_CRC_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc
