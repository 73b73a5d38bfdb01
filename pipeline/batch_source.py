"""What DALI's external source calls: one global step's JPEG views and sample indices.

A pure function of the step and of which samples are unreadable, so DALI may call it ahead
of time and in worker processes, and a resumed run reads what an uninterrupted one did.
Kept free of torch and DALI imports: spawned source workers import only this and the reader.
"""
from __future__ import annotations

import numpy as np

from pipeline.jpeg_check import OK, REASONS, check_jpeg
from pipeline.reader import BetonDataset
from pipeline.sampler import EpochSampler
from pipeline.schema import DatasetError

UNCHECKED = -1
UNDECODABLE = len(REASONS)  # passed the structural check, failed DALI's decoder
REASON_NAMES = (*REASONS, "undecodable")


class BatchSource:
    def __init__(self, dataset: BetonDataset, sampler: EpochSampler, start_step: int = 0) -> None:
        self.dataset, self.sampler, self.start_step = dataset, sampler, start_step
        # One int8 per sample: UNCHECKED, OK, or the reason it is unreadable. Checked lazily,
        # the first time a step reads the sample.
        self.verdicts = np.full(len(dataset), UNCHECKED, dtype=np.int8)
        self._replacements: dict[int, int] = {}

    def __getstate__(self) -> dict:
        # Workers get only the samples known to be unreadable, not a byte per sample.
        state = {**self.__dict__, "_replacements": {}}
        bad = np.flatnonzero((self.verdicts != UNCHECKED) & (self.verdicts != OK))
        state["verdicts"] = (len(self.verdicts), bad, self.verdicts[bad])
        return state

    def __setstate__(self, state: dict) -> None:
        n, bad, reasons = state.pop("verdicts")
        self.__dict__.update(state)
        self.verdicts = np.full(n, UNCHECKED, dtype=np.int8)
        self.verdicts[bad] = reasons

    def verdict(self, index: int) -> int:
        if self.verdicts[index] == UNCHECKED:
            height, width = self.dataset.image_size(index)
            self.verdicts[index] = check_jpeg(self.dataset.jpeg(index), height, width)
        return int(self.verdicts[index])

    def mark(self, indices: list[int], reason: int) -> None:
        self.verdicts[indices] = reason
        self._replacements.clear()  # a replacement may be among them

    @property
    def unreadable(self) -> dict[int, str]:
        bad = np.flatnonzero((self.verdicts != UNCHECKED) & (self.verdicts != OK))
        return {int(i): REASON_NAMES[self.verdicts[i]] for i in bad}

    def replacement(self, index: int) -> int:
        """The next readable sample after `index` (wrapping), which stands in for it."""
        if index not in self._replacements:
            n = len(self.dataset)
            for k in range(1, n):
                candidate = (index + k) % n
                if self.verdict(candidate) == OK:
                    self._replacements[index] = candidate
                    break
            else:
                raise DatasetError(f"{self.dataset.directory}: no sample has a readable JPEG")
        return self._replacements[index]

    def indices(self, step: int) -> np.ndarray:
        """int64 [b]: the sampler's indices at `step`, each unreadable one replaced."""
        indices = self.sampler.indices(step).copy()
        for index in indices[self.verdicts[indices] == UNCHECKED]:  # only samples seen for the first time
            self.verdict(int(index))
        for k in np.flatnonzero(self.verdicts[indices] != OK):
            indices[k] = self.replacement(int(indices[k]))
        return indices

    def __call__(self, info) -> tuple[list[np.ndarray], np.ndarray]:
        # info: DALI's BatchInfo; its iteration counts from the pipeline's start step.
        indices = self.indices(self.start_step + info.iteration)
        return [self.dataset.jpeg(int(i)) for i in indices], indices.reshape(-1, 1)
