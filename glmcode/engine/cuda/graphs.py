"""Replay a decode step from CUDA graphs, one graph per batch-size bucket.

At batch 1 a decode step is hundreds of small kernels, and launching them from Python costs more
than running them. A CUDA graph records the launches once and replays them in one call. Graphs
need fixed shapes and fixed addresses, so the step reads its inputs from static buffers sized for
the largest bucket; a batch of n runs the smallest bucket >= n with the rows past n filled with
harmless pad values (e.g. seq_len 0, which mla_decode answers with zeros, and a scratch cache slot
for the latent write). The step must not sync with the host (no .item(), .tolist(), bincount).

Off CUDA nothing is captured: the step runs eagerly on the same padded buffers, which keeps the
bucket and padding logic testable on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)

Step = Callable[[dict[str, torch.Tensor]], torch.Tensor]


class GraphedStep:
    """`step(inputs) -> output` (first dim = batch) replayed from per-bucket CUDA graphs.

    example_inputs: one tensor per input, its first dim the largest bucket; these become the
    static buffers (cloned). pad_values: the value for each input's rows (and columns) past the
    real batch; inputs without one are padded with 0.
    """

    def __init__(
        self,
        step: Step,
        example_inputs: dict[str, torch.Tensor],
        pad_values: dict[str, float] | None = None,
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
    ):
        self.step = step
        self.buffers = {name: tensor.clone() for name, tensor in example_inputs.items()}
        self.pad_values = pad_values or {}
        self.buckets = tuple(sorted(buckets))
        largest = self.buckets[-1]
        for name, buffer in self.buffers.items():
            if buffer.shape[0] != largest:
                raise ValueError(f"input {name!r} has {buffer.shape[0]} rows, expected the largest bucket {largest}")
        self.device = next(iter(self.buffers.values())).device
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def capture(self) -> None:
        """Record one graph per bucket, largest first, all in one memory pool."""
        if self.device.type != "cuda":
            return
        pool = None
        for bucket in reversed(self.buckets):
            inputs = self._views(bucket)
            self.step(inputs)  # warm-up: Triton compiles, allocator settles
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                output = self.step(inputs)
            pool = graph.pool()
            self.graphs[bucket] = (graph, output)

    def bucket_for(self, batch: int) -> int:
        for bucket in self.buckets:
            if bucket >= batch:
                return bucket
        raise ValueError(f"batch {batch} exceeds the largest captured bucket {self.buckets[-1]}")

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = next(iter(inputs.values())).shape[0]
        bucket = self.bucket_for(batch)
        self._fill(inputs, bucket)
        if bucket in self.graphs:
            graph, output = self.graphs[bucket]
            graph.replay()
        else:
            output = self.step(self._views(bucket))
        return output[:batch]

    def run_eager(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step launched op by op on the same padded buffers, even where a graph exists."""
        batch = next(iter(inputs.values())).shape[0]
        bucket = self.bucket_for(batch)
        self._fill(inputs, bucket)
        return self.step(self._views(bucket))[:batch]

    def _views(self, bucket: int) -> dict[str, torch.Tensor]:
        return {name: buffer[:bucket] for name, buffer in self.buffers.items()}

    def _fill(self, inputs: dict[str, torch.Tensor], bucket: int) -> None:
        if inputs.keys() != self.buffers.keys():
            raise ValueError(f"inputs {sorted(inputs)} differ from the captured {sorted(self.buffers)}")
        for name, value in inputs.items():
            target = self.buffers[name][:bucket]
            if value.dim() != target.dim() or any(v > t for v, t in zip(value.shape[1:], target.shape[1:])):
                raise ValueError(f"input {name!r} of shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
            if value.shape[1:] != target.shape[1:] or value.shape[0] != bucket:
                target.fill_(self.pad_values.get(name, 0))
            target[tuple(slice(0, size) for size in value.shape)].copy_(value)
