"""The weights snapshot: a quantized model saved as built, mapped back by later loads, and every
way its file can be wrong (truncated, foreign, unwritable) ending in a correct model."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmcode.engine import LLM, SamplingParams
from glmcode.engine.weights import snapshot

GREEDY = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[])
PROMPT = [(5 * i + 11) % 300 for i in range(40)]


def engine(checkpoint: Path, cache: Path | None, quantization: str = "int4") -> LLM:
    return LLM(checkpoint, quantization=quantization, dtype="float32", kv_cache_memory=4 << 20, progress=False,
               weights_cache_dir=cache)  # fmt: skip


def snapshots(cache: Path) -> list[Path]:
    return sorted(cache.glob(f"*{snapshot.SUFFIX}"))


def mapped_files(tensor: torch.Tensor) -> set[str]:
    """The files whose mapping holds ``tensor``'s bytes (from /proc/self/maps)."""
    address, files = tensor.data_ptr(), set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(part, 16) for part in fields[0].split("-"))
        if start <= address < end and len(fields) == 6:
            files.add(fields[5])
    return files


@pytest.fixture(scope="module")
def built(tiny_checkpoint):
    """The answer and logits of the model built from the checkpoint, with no snapshot."""
    llm = engine(tiny_checkpoint, None)
    return llm.generate(PROMPT, GREEDY).token_ids, llm.score(PROMPT)


def test_the_second_load_maps_the_snapshot_and_computes_the_same(tiny_checkpoint, tmp_path, built):
    tokens, logits = built
    first = engine(tiny_checkpoint, tmp_path)
    [written] = snapshots(tmp_path)
    assert first.generate(PROMPT, GREEDY).token_ids == tokens

    second = engine(tiny_checkpoint, tmp_path)
    experts = second.model.model.layers[-1].mlp.experts
    weight = experts.up_packed if hasattr(experts, "up_packed") else experts.gate_up[0].packed
    assert str(written) in mapped_files(weight), "the loaded weights are the snapshot's pages"
    assert second.generate(PROMPT, GREEDY).token_ids == tokens
    torch.testing.assert_close(second.score(PROMPT), logits, rtol=0, atol=0)
    assert snapshots(tmp_path) == [written]


def test_another_scheme_gets_its_own_snapshot_and_old_ones_are_evicted(tiny_checkpoint, tmp_path):
    engine(tiny_checkpoint, tmp_path, "int4")
    engine(tiny_checkpoint, tmp_path, "int8")
    assert len(snapshots(tmp_path)) == 2
    engine(tiny_checkpoint, tmp_path, "int4-all")
    assert len(snapshots(tmp_path)) == snapshot.KEEP, "only the most recently used are kept"


def test_a_truncated_snapshot_is_ignored_once_and_built_again(tiny_checkpoint, tmp_path, built, caplog):
    engine(tiny_checkpoint, tmp_path)
    [path] = snapshots(tmp_path)
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.truncate(size // 2)
    llm = engine(tiny_checkpoint, tmp_path)
    assert llm.generate(PROMPT, GREEDY).token_ids == built[0]
    warnings = [r.getMessage() for r in caplog.records if "weights snapshot" in r.getMessage()]
    assert len(warnings) == 1 and "ignoring" in warnings[0], warnings
    assert path.stat().st_size == size, "the snapshot was written again"


class _Planted:
    """An object whose unpickling would create a file: what a malicious cache file could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_foreign_snapshot_runs_no_code_and_is_replaced(tiny_checkpoint, tmp_path, built, caplog):
    engine(tiny_checkpoint, tmp_path)
    [path] = snapshots(tmp_path)
    marker = tmp_path / "planted-code-ran"
    torch.save({"model": _Planted(marker)}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    llm = engine(tiny_checkpoint, tmp_path)
    assert not marker.exists(), "the snapshot's pickle ran code"
    assert llm.generate(PROMPT, GREEDY).token_ids == built[0]
    assert any("ignoring the weights snapshot" in r.getMessage() for r in caplog.records)
    assert str(path) not in mapped_files(llm.model.lm_head.packed), "this load built the weights"
    assert str(path) in mapped_files(engine(tiny_checkpoint, tmp_path).model.lm_head.packed)


def test_a_float_model_gets_no_snapshot(tiny_checkpoint, tmp_path):
    LLM(tiny_checkpoint, dtype="float32", kv_cache_memory=4 << 20, progress=False, weights_cache_dir=tmp_path)
    assert snapshots(tmp_path) == []


# Root ignores file modes, so an unwritable directory is made for real in a child process: a
# read-only bind mount under bubblewrap, or a file-size limit standing in for a full disk.
CHILD = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from glmcode.engine import LLM, SamplingParams
llm = LLM(sys.argv[1], quantization="int4", dtype="float32", kv_cache_memory=4 << 20, progress=False,
          weights_cache_dir=sys.argv[2])
print(json.dumps(llm.generate(sys.argv[3:] and list(map(int, sys.argv[3:])),
                              SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[])).token_ids))
"""


def _child(prefix: list[str], checkpoint: Path, cache: Path, **kwargs) -> tuple[list[int], str]:
    done = subprocess.run([*prefix, sys.executable, "-c", CHILD, str(checkpoint), str(cache), *map(str, PROMPT)],
                          capture_output=True, text=True, timeout=300, **kwargs)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def test_a_read_only_directory_still_loads_and_still_maps_what_it_holds(tiny_checkpoint, tmp_path, built):
    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap for a read-only directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    tokens, stderr = _child(["bwrap", "--dev-bind", "/", "/", "--ro-bind", str(empty), str(empty)], tiny_checkpoint, empty)
    assert tokens == built[0] and snapshots(empty) == []
    assert stderr.count("cannot save the weights snapshot") == 1, stderr

    filled = tmp_path / "filled"
    engine(tiny_checkpoint, filled)
    tokens, stderr = _child(["bwrap", "--dev-bind", "/", "/", "--ro-bind", str(filled), str(filled)], tiny_checkpoint, filled)
    assert tokens == built[0] and "snapshot" not in stderr, stderr


def test_a_full_disk_still_loads_and_leaves_no_partial_file(tiny_checkpoint, tmp_path, built):
    import resource
    import signal

    def small_files_only() -> None:  # every write past 64 KB fails with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    tokens, stderr = _child([], tiny_checkpoint, tmp_path, preexec_fn=small_files_only)
    assert tokens == built[0]
    assert stderr.count("cannot save the weights snapshot") == 1, stderr
    assert list(tmp_path.iterdir()) == [], "a failed write leaves no file"
