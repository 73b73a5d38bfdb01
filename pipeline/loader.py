"""The training loader: sampler -> memory-mapped JPEGs -> DALI three-view graph -> torch batch.

Each `next()` returns the batch contract of DESIGN.md for one global step on this rank:
`image`/`aug1`/`aug2` float32 [b, 3, S, S] (those the objective asks for; fp16 from a GPU
graph with `half`), `text` int64 [b, 77] (one caption per sample, drawn per epoch), `index`
int64 [b]. The views are DALI's own output buffers, handed to torch through DLPack without a
copy; DALI runs on torch's stream and a batch's buffers are kept until the training step that
used them has run (`handoff.Handoff`). The text and index reach the GPU from pinned memory,
without stopping the host.

A corrupt sample does not stop training. Every sample's stored JPEG passes a structural
check (`jpeg_check.py`) before DALI sees it; one that fails is replaced by the next readable
sample of the dataset (so the batch keeps its size and the run its determinism), counted in
`replaced`, and logged once. The stand-in may already be in the batch: one duplicate
(a false negative for the contrastive loss) per corrupt sample, which is rare enough not to
matter. Bytes that pass the check but still make DALI's decoder fail are found by decoding
the batches in flight one by one with the same decoder (nvJPEG for a GPU graph), marked, and
the pipeline is rebuilt at the same step.

Resuming is exact: `state()` after step k holds DALI's own checkpoint (its random states
and iteration count, prefetching accounted for) and the step its pipeline started at; a
loader built with that state hands out the batches the uninterrupted loader would have,
bit for bit. Without a state (a new run, or a resume on another number of ranks) DALI's
draws are seeded from (seed, start step), so a run started at step k does not repeat the
draws of step 0. A state is refused by a loader on the other device: the CPU and GPU graphs
draw differently, so its random states would continue nothing.

The views' sides may change during a run (progressive resolution: `sizes`, a function of the
global step). The pipeline built at step s makes the views of sizes(s); before the batch of a
step whose sizes differ from the pipeline's, that pipeline and its prefetched batches are
dropped and a new one is built at that step, seeded from (seed, step) like any other. A batch's
sizes are then a function of its step alone, and a resume is exact on either side of a change.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def
from nvidia.dali.pipeline import Pipeline

from pipeline.augment import decode, three_view_pipeline
from pipeline.augment_config import VIEWS, AugmentConfig, at_sizes, ssl_side
from pipeline.batch_source import REASON_NAMES, UNDECODABLE, BatchSource
from pipeline.handoff import Handoff
from pipeline.jpeg_check import OK
from pipeline.reader import BetonDataset
from pipeline.sampler import EpochSampler

log = logging.getLogger("slipstream.loader")


@pipeline_def(batch_size=1, num_threads=1, exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
def _decode_one(device: str, hw_decoder_load: float):
    return decode(fn.external_source(name="jpeg"), device, hw_decoder_load)


def dali_decodes(jpegs: list[np.ndarray], device: str = "cpu", device_id: int = 0, hw_decoder_load: float = 0.65) -> list[bool]:
    """Whether the decoder of a `device` graph (DALI's CPU one, or nvJPEG for "gpu", with the
    graph's share for the hardware decoder) accepts each JPEG. One at a time: an error ends a pipeline."""
    results, pipe = [], None
    for data in jpegs:
        if pipe is None:
            pipe = _decode_one(device, hw_decoder_load, device_id=device_id if device == "gpu" else None)
            pipe.build()
        pipe.feed_input("jpeg", [data])
        try:
            pipe.run()
            results.append(True)
        except RuntimeError:
            results.append(False)
            pipe = None
    return results


@contextlib.contextmanager
def _workers_ignore_stop_signals(spawning: bool) -> Iterator[None]:
    """Source workers started in here inherit SIGINT and SIGTERM ignored (an ignored signal
    stays ignored across exec). A launcher that signals a rank's whole process tree must not
    kill them while the rank finishes its step and checkpoints; they exit with the rank."""
    if not spawning or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def pipeline_seed(seed: int, start_step: int) -> int:
    return int(np.random.SeedSequence([seed, start_step]).generate_state(1)[0] >> 1)  # DALI wants a non-negative int32


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
        source_workers: int = 0,
        seed: int = 0,
        start_step: int = 0,
        state: dict | None = None,
        half: bool = False,
        hw_decoder_load: float | None = None,
        sizes: Callable[[int], tuple[int, int]] | None = None,
    ) -> None:
        """`half`: fp16 views from a GPU graph. `hw_decoder_load`: the share of JPEGs for the GPU's
        hardware decoder (None: 0.95 on Hopper and newer, whose engines keep up, else DALI's 0.65).
        `sizes(step)`: (CLIP view side, SimCLR views' side) of that global step's batch (None:
        the augment config's own sides, every step); `augment.blur_sigma` stays in pixels of a
        view of `augment.image_size` whatever the sides of the moment."""
        self.dataset, self.sampler, self.text = dataset, sampler, text
        self.views = tuple(v for v in VIEWS if v in views)  # the graph emits them in VIEWS order
        self.augment, self.threads, self.prefetch, self.source_workers, self.seed = augment, threads, prefetch, source_workers, seed
        self.device_name, self.device_id = device, device_id
        self.device = torch.device("cuda", device_id) if device == "gpu" else torch.device("cpu")
        self.half = half and device == "gpu"
        if hw_decoder_load is None:
            hw_decoder_load = 0.95 if device == "gpu" and torch.cuda.get_device_capability(device_id)[0] >= 9 else 0.65
        self.hw_decoder_load = hw_decoder_load
        own = (augment.image_size, ssl_side(augment))
        self.sizes = sizes or (lambda step: own)
        self.view_sides = own  # (clip, ssl) of the current pipeline's views
        self.resizes = 0  # pipelines rebuilt because the views' sides changed
        self.handoff, self._in_use = Handoff(self.device), None
        self.step = start_step  # the global step of the next batch handed out
        self.replaced = 0  # sample slots filled by a stand-in, over the run so far
        # This process's record of unreadable samples; source workers get a pickled copy.
        self.source = BatchSource(dataset, sampler, start_step)
        self._logged: set[int] = set()
        if state is not None:
            if state.get("device", device) != device:  # a state from before states named their device: trusted
                raise ValueError(f"the loader's saved state comes from a {state.get('device', 'cpu')} graph, this loader decodes on the {device}: "
                                 "its random states would continue nothing; resume with the same data.device, or start afresh")  # fmt: skip
            # Samples only DALI's decoder rejects are not found by the structural check again:
            # they would fail the pipeline and rebuild it with other draws than the first run's.
            self.source.mark([int(i) for i in state["undecodable"]], UNDECODABLE)
            # The checkpointed pipeline counts its iterations from the step it was built at.
            self.pipe = self._build(int(state["origin"]), checkpoint=bytes(state["dali"]))
        else:
            self.pipe = self._build(start_step)

    def state(self) -> dict:
        """What a loader needs to continue exactly after the batches handed out so far."""
        undecodable = [i for i, reason in self.source.unreadable.items() if reason == REASON_NAMES[UNDECODABLE]]
        return {"origin": self.origin, "dali": self.pipe.checkpoint(), "undecodable": undecodable, "device": self.device_name}

    def close(self) -> None:
        """Stop DALI's threads and source worker processes now rather than at garbage collection."""
        if self._in_use is not None:  # the last batch's step may still be queued
            self.handoff.retire(self._in_use)
            self._in_use = None
        self.handoff.close()
        if self.pipe is not None:
            self.pipe._shutdown()
            self.pipe = None

    def _build(self, start_step: int, checkpoint: bytes | None = None) -> Pipeline:
        self.source.start_step = self.origin = start_step
        self.view_sides = tuple(self.sizes(start_step))
        with _workers_ignore_stop_signals(self.source_workers > 0):
            return self._pipeline(start_step, checkpoint)

    def _pipeline(self, start_step: int, checkpoint: bytes | None) -> Pipeline:
        return three_view_pipeline(
            self.source,
            self.views,
            at_sizes(self.augment, *self.view_sides),
            batch_size=self.sampler.local_batch,
            num_threads=self.threads,
            device=self.device_name,
            device_id=self.device_id,
            seed=pipeline_seed(self.seed, start_step),
            prefetch=self.prefetch,
            source_workers=self.source_workers,
            checkpoint=checkpoint,
            half=self.half,
            hw_decoder_load=self.hw_decoder_load,
        )

    @property
    def corrupt(self) -> dict[int, str]:
        """Every sample found unreadable so far, with the reason."""
        return self.source.unreadable

    def _tokens(self, step: int, indices: np.ndarray) -> torch.Tensor:
        choice = self.sampler.caption_choice(step, indices, self.dataset.n_captions)
        rows = [self.dataset.tokens(int(i))[c] for i, c in zip(indices, choice)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))  # (b, 77)

    def _to_torch(self, output) -> torch.Tensor:
        # Zero-copy: the tensor holds DALI's buffer, which the dynamic executor does not reuse
        # while it is referenced. Only a CPU pipeline feeding a GPU trainer copies (to the GPU).
        tensor = torch.from_dlpack(output.as_tensor())
        return tensor if tensor.device == self.device else tensor.to(self.device, non_blocking=True)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        # From pinned memory the copy is asynchronous; from pageable memory it would wait for
        # everything queued on the stream, the last step's backward included.
        return host.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else host

    def _emitted(self, sides: tuple[int, int]) -> tuple[int | None, int | None]:
        """The sides of the views this loader hands out: a side no view has changes nothing."""
        return (sides[0] if "image" in self.views else None, sides[1] if {"aug1", "aug2"} & set(self.views) else None)

    def _run(self) -> tuple:
        if self._in_use is not None:  # the step that used the last batch has been enqueued by now
            self.handoff.retire(self._in_use)
            self._in_use = None
        if self._emitted(tuple(self.sizes(self.step))) != self._emitted(self.view_sides):
            # What the old pipeline prefetched has the old sides: dropped with it.
            self.handoff.close()
            self.pipe._shutdown()
            self.pipe = None
            self.pipe = self._build(self.step)
            self.resizes += 1
        while True:
            try:
                return self.handoff.run(self.pipe)
            except RuntimeError:
                # DALI does not say which sample failed: decode every one it may have been at.
                in_flight = range(self.step, self.step + self.prefetch + 1)
                suspects = sorted({int(i) for step in in_flight for i in self.source.indices(step)})
                verdicts = dali_decodes([self.dataset.jpeg(i) for i in suspects], self.device_name, self.device_id, self.hw_decoder_load)
                found = [i for i, ok in zip(suspects, verdicts) if not ok]
                if not found:
                    raise
            self.source.mark(found, UNDECODABLE)
            self.handoff.close()  # the batches still in use are released before their pipeline goes
            self.pipe = None  # release the failed pipeline (and its workers) before the next
            self.pipe = self._build(self.step)

    def _check_and_note(self, indices: np.ndarray) -> None:
        # A slot differs from the sampler's only where a stand-in replaced an unreadable sample.
        raw = self.sampler.indices(self.step)
        for original, used in zip(raw[raw != indices], indices[raw != indices]):
            original, used = int(original), int(used)
            if self.source.verdict(original) == OK or self.source.replacement(original) != used:
                raise RuntimeError(f"loader out of step at global step {self.step}: DALI returned another batch")
            self.replaced += 1
            if original not in self._logged:
                self._logged.add(original)
                reason = REASON_NAMES[self.source.verdict(original)]
                log.warning(
                    "%s: sample %d is corrupt (%s); replaced by sample %d", self.dataset.shard_path(original), original, reason, used
                )

    def __next__(self) -> dict[str, torch.Tensor]:
        index_out, *view_outs = self._run()
        indices = np.asarray(index_out.as_cpu().as_tensor()).reshape(-1).astype(np.int64)  # (b,)
        self._check_and_note(indices)
        batch = {name: self._to_torch(out) for name, out in zip(self.views, view_outs)}
        # DALI's outputs and torch's views of them, kept until the step that reads them has run.
        self._in_use = (index_out, view_outs, [batch[name] for name in self.views])
        if self.text:
            batch["text"] = self._to_device(self._tokens(self.step, indices))
        batch["index"] = self._to_device(torch.from_numpy(indices))
        self.step += 1
        return batch
