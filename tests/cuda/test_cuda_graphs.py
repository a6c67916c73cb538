"""GraphedStep's buckets and padding (the CUDA-graph capture itself runs in scripts/gpu_check.py)."""

from __future__ import annotations

import pytest
import torch

from glmcode.engine.cuda.graphs import GraphedStep
from glmcode.engine import ops


def decode_step_over(cache: torch.Tensor):
    def step(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return ops.mla_decode.reference(
            inputs["q_nope"], inputs["q_pe"], cache, inputs["block_tables"], inputs["seq_lens"], 0.25
        )

    return step


def random_batch(batch: int, table_width: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "q_nope": torch.randn(batch, 3, 16, generator=gen),
        "q_pe": torch.randn(batch, 3, 8, generator=gen),
        "block_tables": torch.randint(0, 12, (batch, table_width), generator=gen, dtype=torch.int32),
        "seq_lens": torch.randint(1, 4 * table_width + 1, (batch,), generator=gen, dtype=torch.int32),
    }


@pytest.fixture
def graphed():
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(12, 4, 24, generator=gen)
    step = decode_step_over(cache)
    example = random_batch(8, table_width=5, gen=gen)
    runner = GraphedStep(step, example, pad_values={"seq_lens": 0}, buckets=(1, 2, 4, 8))
    runner.capture()  # a no-op off CUDA
    return runner, step, gen


def test_a_padded_bucket_gives_the_unpadded_answer(graphed):
    runner, step, gen = graphed
    for batch, width in ((3, 5), (1, 2), (8, 5), (5, 3)):
        inputs = random_batch(batch, width, gen)
        got = runner(inputs)
        assert got.shape == (batch, 3, 16)
        torch.testing.assert_close(got, step(inputs))


def test_rows_past_the_batch_are_padded_and_stale_values_are_cleared(graphed):
    runner, _, gen = graphed
    runner(random_batch(4, 5, gen))
    runner(random_batch(3, 2, gen))  # bucket 4 again: row 3 must not keep the earlier sequence
    assert runner.bucket_for(3) == 4
    assert runner.buffers["seq_lens"][3].item() == 0
    assert runner.buffers["block_tables"][:3, 2:].abs().sum().item() == 0


def test_rejects_what_no_bucket_can_hold(graphed):
    runner, _, gen = graphed
    with pytest.raises(ValueError, match="largest captured bucket"):
        runner(random_batch(9, 5, gen))
    with pytest.raises(ValueError, match="does not fit"):
        runner(random_batch(2, 6, gen))
    with pytest.raises(ValueError, match="differ from the captured"):
        runner({"q_nope": torch.zeros(1, 3, 16)})


def test_example_inputs_must_cover_the_largest_bucket():
    with pytest.raises(ValueError, match="largest bucket"):
        GraphedStep(lambda inputs: inputs["x"], {"x": torch.zeros(4, 2)}, buckets=(1, 8))
