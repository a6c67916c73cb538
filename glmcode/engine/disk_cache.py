"""The prefix cache's disk tier: full KV blocks kept in files, so a restart does not recompute them.

Every full block the engine computes (its latents in every layer, plus the scales of a quantized
cache) is written to `<root>/<fingerprint>/<hash[:2]>/<hash>.kv`, named by the block's chained
prefix hash (block_manager.chain_hash). When a new request's leading blocks miss the in-memory
prefix cache, the block manager asks this tier, and a block found here is read straight into a
fresh cache block instead of being prefilled.

The fingerprint covers everything that changes the cached values (the checkpoint, the weight
precision, the model and KV dtypes, the block size, the device kind, this file format), so a
different model or setting never reads another's files.

Writes run on a background thread from copies of the blocks (the engine may reuse a block at
once), each to a temporary file renamed into place, so a reader sees a whole file or none. A
file is checked when read (magic, format, fingerprint, its tokens, sizes, CRC-32 of header and
payload); one that fails is skipped with one warning line, deleted, and its block recomputed. A
directory that cannot be written (read-only, full disk) stops the writes with one warning; the
engine goes on without them. The directory is kept under a size budget: when a write takes it
over, the least recently used files (by modification time, which a read refreshes) go first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glmcode.engine.kv_cache import KVCache

logger = logging.getLogger("glmcode.engine.disk_cache")

FORMAT_VERSION = 1
MAGIC = b"GLMKVBLK"
_PREAMBLE = struct.Struct("<8sIII")  # magic, format version, header length, CRC-32 of the header
DEFAULT_BUDGET = 10 * 2**30
MAX_BUDGET_SHARE_OF_FREE = 0.5  # the default budget never takes more than half the free space
EVICT_TO = 0.9  # an eviction frees space down to this share of the budget
MAX_PENDING_BYTES = 256 * 2**20  # block copies waiting to be written; a store waits beyond that
SUFFIX = ".kv"


def fingerprint(identity: dict[str, Any]) -> str:
    """A short stable name for everything that changes the KV values."""
    text = json.dumps({**identity, "format": FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def checkpoint_identity(model_dir: str | Path) -> dict[str, Any]:
    """What identifies a checkpoint on disk: its config's contents, and each weight file's name,
    size and modification time (reading 60 GB to hash them would cost more than it saves)."""
    model_dir = Path(model_dir)
    files = {}
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.json")):
        stat = path.stat()
        files[path.name] = [stat.st_size, stat.st_mtime_ns]
    config = model_dir / "config.json"
    config_hash = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None
    return {"checkpoint": str(model_dir.resolve()), "config": config_hash, "files": files}


def default_budget(directory: Path) -> int:
    """DEFAULT_BUDGET, or half the free space where that is less."""
    try:
        free = free_bytes(directory)
    except OSError:
        return DEFAULT_BUDGET
    return min(DEFAULT_BUDGET, int(free * MAX_BUDGET_SHARE_OF_FREE))


def free_bytes(directory: Path) -> int:
    existing = next((d for d in (directory, *directory.parents) if d.exists()), directory)
    stats = os.statvfs(existing)
    return stats.f_bavail * stats.f_frsize


class CorruptFile(Exception):
    """A cache file that cannot be trusted; the message says why."""


@dataclass
class DiskCacheStats:
    loaded_blocks: int = 0  # read back into the KV cache
    stored_blocks: int = 0  # written to disk
    rejected_files: int = 0  # corrupted, truncated or foreign: skipped and recomputed
    evicted_files: int = 0


class DiskCache:
    """One model's KV blocks on disk (see the module docstring).

    The block manager calls `contains`, `load` and `store` under the engine lock; `flush` waits
    until every stored block is on disk; `close` also stops the writer.
    """

    def __init__(self, root: str | Path, model_fingerprint: str, kv_cache: KVCache, *, budget: int | None = None):
        self.root = Path(root).expanduser()
        self.fingerprint = model_fingerprint
        self.directory = self.root / model_fingerprint
        self.kv_cache = kv_cache
        self.budget = budget if budget is not None else default_budget(self.root)
        self.stats = DiskCacheStats()
        self.writable = True
        self._parts = [kv_cache.data] + ([kv_cache.scales] if kv_cache.scales is not None else [])
        self._part_specs = [{"dtype": str(p.dtype), "shape": [p.shape[0], kv_cache.block_size, *p.shape[2:]]}
                            for p in self._parts]  # fmt: skip
        self._block_bytes = sum(_nbytes(spec) for spec in self._part_specs)
        self._rejected: set[int] = set()  # hashes whose file was bad: the next store replaces it
        self._queued: set[int] = set()
        self._pending: deque[tuple[int, tuple[int, ...], list[torch.Tensor]]] = deque()
        self._pending_bytes = 0
        self._condition = threading.Condition()
        self._closed = False
        self._bytes_on_disk = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._bytes_on_disk = sum(size for _, size, _ in self._files())
        except OSError as error:
            self._stop_writing(error)
        self._writer = threading.Thread(target=self._write_loop, name="glmcode-kv-disk-writer", daemon=True)
        self._writer.start()

    # ----- called by the block manager -----

    def contains(self, block_hash: int) -> bool:
        return block_hash in self._queued or self._path(block_hash).is_file()

    def load(self, block_hash: int, tokens: tuple[int, ...], block_id: int) -> bool:
        """Read the block into cache block `block_id`; False (and nothing changed) if it cannot be."""
        if block_hash in self._queued:
            self.flush()  # written a moment ago by this process: let it land first
        path = self._path(block_hash)
        try:
            payload = self._read(path, block_hash, tokens)
        except FileNotFoundError:
            return False  # evicted (perhaps by another process) since `contains`
        except (CorruptFile, OSError) as problem:
            self._reject(path, block_hash, problem)
            return False
        start = block_id * self.kv_cache.block_size
        stop = start + self.kv_cache.block_size
        offset = 0
        for part, spec in zip(self._parts, self._part_specs):
            size = _nbytes(spec)
            raw = torch.frombuffer(payload, dtype=torch.uint8, count=size, offset=offset)
            offset += size
            part[:, start:stop].copy_(raw.view(part.dtype).view(spec["shape"]))
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        self.stats.loaded_blocks += 1
        return True

    def store(self, block_hash: int, tokens: tuple[int, ...], block_id: int) -> None:
        """Queue a copy of a freshly computed full block for writing (skipped if already on disk)."""
        if not self.writable or self._closed or self._block_bytes > self.budget:
            return
        if block_hash in self._queued or (block_hash not in self._rejected and self._path(block_hash).is_file()):
            return
        start = block_id * self.kv_cache.block_size
        stop = start + self.kv_cache.block_size
        copies = [part[:, start:stop].to("cpu", copy=True) for part in self._parts]
        with self._condition:
            while self._pending_bytes > MAX_PENDING_BYTES and not self._closed:
                self._condition.wait()
            self._pending.append((block_hash, tokens, copies))
            self._pending_bytes += self._block_bytes
            self._queued.add(block_hash)
            self._condition.notify_all()

    # ----- lifetime -----

    def flush(self) -> None:
        """Wait until every queued block is written (or dropped because writes stopped)."""
        with self._condition:
            while self._pending or self._queued:
                if not self._writer.is_alive():
                    return
                self._condition.wait(timeout=1.0)

    def close(self) -> None:
        self.flush()
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._writer.join(timeout=10)

    def usage(self) -> tuple[int, int]:
        """(files, bytes) this model has on disk."""
        files = list(self._files())
        return len(files), sum(size for _, size, _ in files)

    # ----- files -----

    def _path(self, block_hash: int) -> Path:
        name = f"{block_hash:032x}"
        return self.directory / name[:2] / f"{name}{SUFFIX}"

    def _header(self, block_hash: int, tokens: tuple[int, ...], checksum: int) -> bytes:
        return json.dumps({
            "fingerprint": self.fingerprint, "hash": f"{block_hash:032x}", "tokens": list(tokens),
            "parts": self._part_specs, "payload_crc32": checksum,
        }, separators=(",", ":")).encode()  # fmt: skip

    def _read(self, path: Path, block_hash: int, tokens: tuple[int, ...]) -> bytearray:
        with path.open("rb") as handle:
            preamble = handle.read(_PREAMBLE.size)
            if len(preamble) < _PREAMBLE.size:
                raise CorruptFile("truncated")
            magic, version, header_length, header_crc = _PREAMBLE.unpack(preamble)
            if magic != MAGIC:
                raise CorruptFile("not a glmcode KV block file")
            if version != FORMAT_VERSION:
                raise CorruptFile(f"format version {version}, this glmcode reads {FORMAT_VERSION}")
            header_bytes = handle.read(header_length)
            if len(header_bytes) < header_length:
                raise CorruptFile("truncated")
            if zlib.crc32(header_bytes) != header_crc:
                raise CorruptFile("header checksum mismatch")
            header = json.loads(header_bytes)
            if header.get("fingerprint") != self.fingerprint:
                raise CorruptFile("written for another model or setting")
            if header.get("hash") != f"{block_hash:032x}" or tuple(header.get("tokens", ())) != tokens:
                raise CorruptFile("holds another block")
            if header.get("parts") != self._part_specs:
                raise CorruptFile("holds a block of another shape")
            size = self._block_bytes
            payload = bytearray(size)
            if handle.readinto(payload) != size or handle.read(1):
                raise CorruptFile("truncated" if len(payload) != size else "longer than its header says")
        if zlib.crc32(payload) != header.get("payload_crc32"):
            raise CorruptFile("checksum mismatch")
        return payload

    def _write(self, block_hash: int, tokens: tuple[int, ...], copies: list[torch.Tensor]) -> None:
        buffers = [copy.contiguous().view(torch.uint8).numpy().data for copy in copies]
        checksum = 0
        for buffer in buffers:
            checksum = zlib.crc32(buffer, checksum)
        header = self._header(block_hash, tokens, checksum)
        path = self._path(block_hash)
        path.parent.mkdir(exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with temporary.open("wb") as handle:
                handle.write(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header), zlib.crc32(header)))
                handle.write(header)
                for buffer in buffers:
                    handle.write(buffer)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        self._rejected.discard(block_hash)
        self.stats.stored_blocks += 1
        self._bytes_on_disk += path.stat().st_size
        if self._bytes_on_disk > self.budget:
            self._evict()

    def _write_loop(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._closed:
                    self._condition.wait()
                if not self._pending:
                    return
                block_hash, tokens, copies = self._pending.popleft()
            try:
                if self.writable:
                    self._write(block_hash, tokens, copies)
            except OSError as error:
                self._stop_writing(error)
            except Exception as error:  # never let the writer die with blocks still queued
                self._stop_writing(error)
            finally:
                with self._condition:
                    self._queued.discard(block_hash)
                    self._pending_bytes -= self._block_bytes
                    self._condition.notify_all()

    def _files(self):
        """(path, size, mtime) of every block file of this model."""
        for subdirectory in self.directory.iterdir():
            if not subdirectory.is_dir():
                continue
            for path in subdirectory.iterdir():
                if path.suffix == SUFFIX and not path.name.startswith("."):
                    try:
                        stat = path.stat()
                    except FileNotFoundError:
                        continue
                    yield path, stat.st_size, stat.st_mtime_ns

    def _evict(self) -> None:
        """Delete least recently used files until the directory is under EVICT_TO of the budget."""
        files = sorted(self._files(), key=lambda file: file[2])
        total = sum(size for _, size, _ in files)
        for path, size, _ in files:
            if total <= self.budget * EVICT_TO:
                break
            path.unlink(missing_ok=True)
            total -= size
            self.stats.evicted_files += 1
        self._bytes_on_disk = total

    def _reject(self, path: Path, block_hash: int, problem: Exception) -> None:
        self.stats.rejected_files += 1
        self._rejected.add(block_hash)
        reason = problem.strerror if isinstance(problem, OSError) and problem.strerror else str(problem)
        logger.warning("glmcode: warning: skipping KV cache file %s (%s); recomputing that block", path, reason)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass

    def _stop_writing(self, error: Exception) -> None:
        if not self.writable:
            return
        self.writable = False
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        logger.warning("glmcode: warning: the KV disk cache at %s cannot be written (%s); continuing without "
                       "saving to it", self.directory, reason)  # fmt: skip


def _nbytes(spec: dict[str, Any]) -> int:
    count = 1
    for dim in spec["shape"]:
        count *= dim
    return count * getattr(torch, spec["dtype"].removeprefix("torch.")).itemsize

