"""The prefix cache's disk tier: what one engine computed, the next one reads back."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmcode.engine import LLM, SamplingParams
from glmcode.engine.block_manager import chain_hash
from glmcode.engine.disk_cache import SUFFIX

from .stepping import new_sequence, prefill

BLOCK = 16
PROMPT = [(7 * i + 3) % 300 for i in range(5 * BLOCK + 3)]  # five full blocks and a bit
CACHED_BLOCKS = 5  # the last prompt token is never served from a cache: (len - 1) // BLOCK
GREEDY = SamplingParams(max_tokens=4, temperature=0, stop_token_ids=[])


def engine(checkpoint: Path, cache_dir: Path | None, **options) -> LLM:
    options = {"dtype": "float32", "block_size": BLOCK, "kv_cache_memory": 4 << 20, "progress": False} | options
    return LLM(checkpoint, disk_cache_dir=cache_dir, **options)


def warm(checkpoint: Path, cache_dir: Path, **options) -> LLM:
    """An engine that computed PROMPT and wrote its blocks to disk."""
    llm = engine(checkpoint, cache_dir, **options)
    llm.generate(PROMPT, GREEDY)
    llm.close()
    return llm


def cold_answer(checkpoint: Path):
    return engine(checkpoint, None).generate(PROMPT, GREEDY)


def block_files(llm: LLM) -> list[Path]:
    return sorted(llm.disk_cache.directory.rglob(f"*{SUFFIX}"))


def file_of_block(llm: LLM, index: int) -> Path:
    block_hash = None
    for i in range(index + 1):
        block_hash = chain_hash(block_hash, tuple(PROMPT[i * BLOCK : (i + 1) * BLOCK]))
    return llm.disk_cache._path(block_hash)


def test_a_restarted_engine_reads_the_blocks_back_and_gets_the_same_logits(tiny_checkpoint, tmp_path):
    first = warm(tiny_checkpoint, tmp_path)
    assert len(block_files(first)) == CACHED_BLOCKS and first.disk_cache.stats.stored_blocks == CACHED_BLOCKS

    restarted = engine(tiny_checkpoint, tmp_path)
    seq = new_sequence(PROMPT)
    assert restarted.blocks.allocate(seq)
    assert seq.num_computed == CACHED_BLOCKS * BLOCK and restarted.disk_cache.stats.loaded_blocks == CACHED_BLOCKS
    # The latents read back are the ones the first engine computed, bit for bit.
    for index, block_id in enumerate(seq.block_table[:CACHED_BLOCKS]):
        first_block = first.blocks.hash_to_block[restarted.blocks.blocks[block_id].hash]
        mine = restarted.kv_cache.data[:, block_id * BLOCK : (block_id + 1) * BLOCK]
        theirs = first.kv_cache.data[:, first_block * BLOCK : (first_block + 1) * BLOCK]
        assert torch.equal(mine, theirs), f"block {index}"
    logits = prefill(restarted, seq)
    restarted.blocks.free_sequence(seq)
    torch.testing.assert_close(logits, restarted.score(PROMPT)[-1], atol=1e-4, rtol=0)


def test_a_request_served_from_disk_reports_cached_tokens_and_decodes_the_same(tiny_checkpoint, tmp_path):
    cold = cold_answer(tiny_checkpoint)
    warm(tiny_checkpoint, tmp_path)
    served = engine(tiny_checkpoint, tmp_path).generate(PROMPT, GREEDY)
    assert served.stats.cached_tokens == CACHED_BLOCKS * BLOCK and cold.stats.cached_tokens == 0
    assert served.token_ids == cold.token_ids


def test_another_model_or_setting_never_reads_the_files(tiny_checkpoint, make_checkpoint, tmp_path):
    base = warm(tiny_checkpoint, tmp_path)
    for other in (
        engine(tiny_checkpoint, tmp_path, block_size=32),
        engine(tiny_checkpoint, tmp_path, kv_cache_dtype="int8"),
        engine(make_checkpoint("disk-other-seed", seed=1), tmp_path),
    ):
        assert other.fingerprint != base.fingerprint
        assert other.generate(PROMPT, GREEDY).stats.cached_tokens == 0
        assert other.disk_cache.stats.loaded_blocks == 0


def _flip_a_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _foreign(path: Path, tmp_path: Path, checkpoint: Path) -> None:
    """The same block written by an engine with another fingerprint (another KV dtype)."""
    other = warm(checkpoint, tmp_path / "elsewhere", kv_cache_dtype="int8")
    shutil.copyfile(other.disk_cache._path(int(path.stem, 16)), path)


@pytest.mark.parametrize("damage", ["corrupted", "truncated", "foreign"])
def test_a_bad_file_is_skipped_with_one_warning_recomputed_and_rewritten(tiny_checkpoint, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    cold = cold_answer(tiny_checkpoint)
    bad = file_of_block(warm(tiny_checkpoint, cache), 2)
    {"corrupted": _flip_a_payload_byte, "truncated": _truncate,
     "foreign": lambda path: _foreign(path, tmp_path, tiny_checkpoint)}[damage](bad)  # fmt: skip

    with caplog.at_level(logging.WARNING, logger="glmcode.engine.disk_cache"):
        llm = engine(tiny_checkpoint, cache)
        answer = llm.generate(PROMPT, GREEDY)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "recomputing" in warnings[0], warnings
    assert llm.disk_cache.stats.rejected_files == 1
    assert answer.stats.cached_tokens == 2 * BLOCK  # the blocks before the bad one
    assert answer.token_ids == cold.token_ids
    llm.close()  # the recomputed blocks are written again
    assert engine(tiny_checkpoint, cache).generate(PROMPT, GREEDY).stats.cached_tokens == CACHED_BLOCKS * BLOCK


def test_the_budget_evicts_the_least_recently_used_files(tiny_checkpoint, tmp_path):
    first = warm(tiny_checkpoint, tmp_path)
    size = block_files(first)[0].stat().st_size
    small = engine(tiny_checkpoint, tmp_path, disk_cache_budget=int(size * 6.5))
    other_prompt = [t + 1 for t in PROMPT]
    small.generate(other_prompt, GREEDY)  # five more blocks: the oldest files make room
    small.close()
    files, total = small.disk_cache.usage()
    assert total <= size * 6.5 and small.disk_cache.stats.evicted_files >= 4
    assert engine(tiny_checkpoint, tmp_path).generate(other_prompt, GREEDY).stats.cached_tokens == CACHED_BLOCKS * BLOCK


# A directory nobody may write: root ignores file modes, so the tests make it read-only (or full)
# for real, in a child process under bubblewrap (a read-only bind mount) or a file-size limit.
CHILD = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from glmcode.engine import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", block_size=16, kv_cache_memory=4 << 20, progress=False, disk_cache_dir=sys.argv[2])
prompt = [(7 * i + 3) % 300 for i in range(83)]
answer = llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0, stop_token_ids=[]))
llm.close()
print(json.dumps({"tokens": answer.token_ids, "cached": answer.stats.cached_tokens,
                  "stored": llm.disk_cache.stats.stored_blocks, "writable": llm.disk_cache.writable}))
"""


def _run_child(prefix: list[str], checkpoint: Path, cache: Path, **kwargs) -> tuple[dict, str]:
    done = subprocess.run([*prefix, sys.executable, "-c", CHILD, str(checkpoint), str(cache)],
                          capture_output=True, text=True, timeout=300, **kwargs)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def _read_only(path: Path) -> list[str]:
    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap for a read-only directory")
    return ["bwrap", "--dev-bind", "/", "/", "--ro-bind", str(path), str(path)]


def test_a_read_only_directory_still_answers_and_still_serves_what_it_holds(tiny_checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result, stderr = _run_child(_read_only(empty), tiny_checkpoint, empty)
    assert result["cached"] == 0 and result["stored"] == 0 and not result["writable"]
    assert stderr.count("cannot be written") == 1, stderr

    filled = tmp_path / "filled"
    cold = cold_answer(tiny_checkpoint)
    warm(tiny_checkpoint, filled)
    result, stderr = _run_child(_read_only(filled), tiny_checkpoint, filled)
    assert result["cached"] == CACHED_BLOCKS * BLOCK and result["tokens"] == cold.token_ids


def test_a_full_disk_still_answers(tiny_checkpoint, tmp_path):
    import resource
    import signal

    def small_files_only() -> None:  # every write past 1 KB fails with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    cold = cold_answer(tiny_checkpoint)
    result, stderr = _run_child([], tiny_checkpoint, tmp_path / "full", preexec_fn=small_files_only)
    assert result["tokens"] == cold.token_ids and not result["writable"] and result["stored"] == 0
    assert stderr.count("cannot be written") == 1, stderr
    assert not list((tmp_path / "full").rglob("*.tmp")), "a failed write leaves no temporary file"


def test_a_cache_path_that_is_a_file_degrades_to_no_disk_tier(tiny_checkpoint, tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="glmcode.engine.disk_cache"):
        llm = engine(tiny_checkpoint, blocker)
        assert llm.generate(PROMPT, GREEDY).finish_reason == "length"
    assert not llm.disk_cache.writable and len(caplog.records) == 1

