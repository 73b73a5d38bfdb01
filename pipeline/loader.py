"""The training loader: sampler -> memory-mapped JPEGs -> DALI three-view graph -> torch batch.

Each `next()` returns the batch contract of DESIGN.md for one global step on this rank:
`image`/`aug1`/`aug2` float32 [b, 3, S, S] (those the objective asks for), `text` int64
[b, 77] (one caption per sample, drawn per epoch), `index` int64 [b].
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from nvidia.dali.types import BatchInfo

from pipeline.augment import VIEWS, AugmentConfig, three_view_pipeline
from pipeline.reader import BetonDataset
from pipeline.sampler import EpochSampler


class ThreeViewLoader(Iterator[dict[str, torch.Tensor]]):
    def __init__(
        self,
        dataset: BetonDataset,
        sampler: EpochSampler,
        views: tuple[str, ...],
        augment: AugmentConfig,
        *,
        text: bool = True,
        device: str = "cpu",
        device_id: int = 0,
        threads: int = 2,
        prefetch: int = 2,
        seed: int = 0,
        start_step: int = 0,
    ) -> None:
        self.dataset, self.sampler, self.text = dataset, sampler, text
        self.views = tuple(v for v in VIEWS if v in views)  # the graph emits them in VIEWS order
        self.start_step = start_step
        self.step = start_step  # the global step of the next batch handed out
        self.device = torch.device("cuda", device_id) if device == "gpu" else torch.device("cpu")
        self.pipe = three_view_pipeline(
            self._source,
            self.views,
            augment,
            batch_size=sampler.local_batch,
            num_threads=threads,
            device=device,
            device_id=device_id,
            seed=seed,
            prefetch=prefetch,
        )

    def _source(self, info: BatchInfo) -> tuple[list[np.ndarray], np.ndarray]:
        # DALI calls this ahead of time (prefetch); the step comes from its iteration count.
        indices = self.sampler.indices(self.start_step + info.iteration)
        return [self.dataset.jpeg(int(i)) for i in indices], indices.reshape(-1, 1)

    def _tokens(self, step: int, indices: np.ndarray) -> torch.Tensor:
        choice = self.sampler.caption_choice(step, indices, self.dataset.n_captions)
        rows = [self.dataset.tokens(int(i))[c] for i, c in zip(indices, choice)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))  # (b, 77)

    def _to_torch(self, output) -> torch.Tensor:
        # DALI reuses its output buffers on the next run, so the batch gets memory of its own.
        tensor = torch.from_dlpack(output.as_tensor())
        return tensor.clone() if tensor.device == self.device else tensor.to(self.device)

    def __next__(self) -> dict[str, torch.Tensor]:
        index_out, *view_outs = self.pipe.run()
        indices = np.asarray(index_out.as_cpu().as_tensor()).reshape(-1).astype(np.int64)  # (b,)
        expected = self.sampler.indices(self.step)
        if not np.array_equal(indices, expected):
            raise RuntimeError(f"loader out of step at global step {self.step}: DALI returned another batch")
        batch = {name: self._to_torch(out) for name, out in zip(self.views, view_outs)}
        if self.text:
            batch["text"] = self._tokens(self.step, indices).to(self.device)
        batch["index"] = torch.from_numpy(indices).to(self.device)
        self.step += 1
        return batch
