"""Which samples each rank reads at each global step: a pure function of (seed, step).

Every epoch is a fresh seeded permutation of the whole dataset; step s of an epoch takes the
global batch at positions [s*B, (s+1)*B) of it and rank r its slice [r*b, (r+1)*b). The tail
of an epoch that does not fill a global batch is dropped (drop-last), so all ranks see equal,
disjoint batches. Because nothing depends on what ran before, resuming at any step replays
exactly the sequence an uninterrupted run would have read.
"""
from __future__ import annotations

import numpy as np


class EpochSampler:
    def __init__(self, n_samples: int, global_batch: int, *, seed: int, rank: int = 0, world: int = 1) -> None:
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} ranks")
        if n_samples < global_batch:
            raise ValueError(f"dataset has {n_samples} samples, fewer than one global batch of {global_batch}")
        self.n_samples, self.global_batch, self.seed = n_samples, global_batch, seed
        self.rank, self.world = rank, world
        self.local_batch = global_batch // world
        self.steps_per_epoch = n_samples // global_batch
        # Per-epoch arrays, kept for the current and the previous epoch: DALI prefetches
        # across an epoch boundary while the loop still reads the old epoch's last steps.
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def __getstate__(self) -> dict:
        # Sent to DALI's source workers: the permutations are cheaper to redraw than to pickle.
        return {**self.__dict__, "_cache": {}}

    def _cached(self, kind: str, epoch: int) -> np.ndarray:
        key = (kind, epoch)
        if key not in self._cache:
            rng = np.random.default_rng([self.seed, epoch, int(kind == "captions")])
            self._cache[key] = rng.random(self.n_samples) if kind == "captions" else rng.permutation(self.n_samples)
            if len(self._cache) > 4:  # the epochs either side of a boundary, for both kinds
                del self._cache[next(iter(self._cache))]
        return self._cache[key]

    def permutation(self, epoch: int) -> np.ndarray:
        return self._cached("order", epoch)  # (n,)

    def caption_draws(self, epoch: int) -> np.ndarray:
        """Uniform [0, 1) per sample: sample i reads caption floor(u_i * n_captions_i) this epoch."""
        return self._cached("captions", epoch)  # (n,)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> np.ndarray:
        """int64 [b]: this rank's sample indices at global step `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch + self.rank * self.local_batch
        return self.permutation(epoch)[start : start + self.local_batch].astype(np.int64)

    def caption_choice(self, step: int, indices: np.ndarray, n_captions: np.ndarray) -> np.ndarray:
        """int64 [b]: which of each sample's captions to read at this step."""
        u = self.caption_draws(self.epoch_of(step))[indices]
        return np.minimum((u * n_captions[indices]).astype(np.int64), n_captions[indices] - 1)
