"""The training view of the SGD linear probe: RandomResizedCrop (scale 0.08-1) and a horizontal
flip, as MoCo v3's linear script (which SLIP's evaluation used) augments, drawn anew every epoch.

The random draws are made on the host, from the seed, the epoch and the sample's position in the
training set alone (`view_draws`), and fed to DALI. So a sample's view does not depend on which
rank reads it or in which batch: a run over several processes sees the views one process would
see, which is what lets the probe be tested against its one-process run, and restarted.

On the CPU the crop is the compiled kernel of `augment_kernels.py` (torchvision's window sampler
and Pillow's resize, given the same uniforms). On the GPU the same window is computed on DALI's
CPU threads from the image's header (`fn.peek_image_shape`), and nvJPEG decodes that window
only (`fn.decoders.image_slice`), which is then resized on the GPU.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from functools import cache
from typing import Any

import numpy as np
import torch

from pipeline import augment_kernels
from pipeline.augment_config import AugmentConfig
from pipeline.eval_view import Sample, Skipped, checked, decode_batches

# torchvision's RandomResizedCrop defaults, which MoCo v3's linear script uses.
PROBE_SCALE = (0.08, 1.0)
PROBE_RATIO = (3 / 4, 4 / 3)
_UNIFORMS = 40  # the window sampler's 10 attempts x (area, log-ratio, top, left)
_BELOW_ONE = np.nextafter(np.float32(1), np.float32(0))  # a float64 draw may round up to 1.0 in float32


def view_draws(seed: int, epoch: int, keys: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """(params float32 [b, 44]: 40 uniforms in [0, 1), then scale and ratio ranges; flip int32 [b]),
    a pure function of (seed, epoch, key) for each key."""
    keys = list(keys)
    params = np.empty((len(keys), _UNIFORMS + 4), dtype=np.float32)  # (b, 44)
    flip = np.empty(len(keys), dtype=np.int32)  # (b,)
    for row, key in enumerate(keys):
        u = np.random.default_rng([seed, epoch, key]).random(_UNIFORMS + 1)  # (41,)
        params[row, :_UNIFORMS] = np.minimum(u[:_UNIFORMS].astype(np.float32), _BELOW_ONE)
        flip[row] = int(u[_UNIFORMS] < 0.5)
    params[:, _UNIFORMS:] = [*PROBE_SCALE, *PROBE_RATIO]
    return params, flip


def _window_run(anchor, extent, shape, params):  # compiled by numba: (top, left) and (h, w) of the crop
    top, left, h, w = augment_kernels.crop_window(shape[0], shape[1], params[:40], (params[40], params[41]), (params[42], params[43]))
    anchor[0], anchor[1] = top, left
    extent[0], extent[1] = h, w


def _window_setup(outs, ins):  # two outputs of 2 values per sample
    for o in range(2):
        for i in range(len(outs[o])):
            outs[o][i][0] = 2


@cache
def _window_operator() -> Any:
    from nvidia.dali import types
    from nvidia.dali.plugin.numba.experimental import NumbaFunction

    return NumbaFunction(
        run_fn=_window_run,
        setup_fn=_window_setup,
        in_types=[types.INT64, types.FLOAT],
        out_types=[types.FLOAT, types.FLOAT],
        ins_ndim=[1, 1],  # the image's (H, W, C) and its 44 parameters
        outs_ndim=[1, 1],
        batch_processing=False,
    )


def train_graph(augment: AugmentConfig, batch_size: int, threads: int, device: str, device_id: int | None, *,
                crop: str | None = None) -> Any:  # fmt: skip
    """The fed DALI pipeline, defined but not built. Inputs: "encoded" (the images), "key" (int64
    [b, 1], returned), "params" (float32 [b, 44], `view_draws`) and "flip" (int32 [b]). Output:
    float32 [b, 3, S, S] views, normalised, S = augment.image_size. `crop`: "kernel" (the CPU
    default) or "roi" (window decode and resize, the GPU's way; on the CPU for tests)."""
    from nvidia.dali import fn, pipeline_def, types

    from pipeline import augment_ops
    from pipeline.augment import decode, normalize

    crop = crop or ("roi" if device == "gpu" else "kernel")
    if crop not in ("kernel", "roi") or (crop == "kernel" and device == "gpu"):
        raise ValueError(f"crop must be 'roi' on the GPU, 'kernel' or 'roi' on the CPU; got '{crop}' on {device}")
    size = augment.image_size

    @pipeline_def
    def graph():
        jpegs, key = fn.external_source(name="encoded"), fn.external_source(name="key")
        params, flip = fn.external_source(name="params"), fn.external_source(name="flip")
        if crop == "kernel":
            view = augment_ops.random_resized_crop(decode(jpegs, "cpu"), params, size)
        else:
            anchor, extent = _window_operator()(fn.peek_image_shape(jpegs), params)
            decoder = {"device": "mixed", "jpeg_fancy_upsampling": True} if device == "gpu" else {"device": "cpu"}
            window = fn.decoders.image_slice(jpegs, anchor, extent, axis_names="HW", normalized_anchor=False, normalized_shape=False,
                                             output_type=types.RGB, **decoder)  # fmt: skip
            view = fn.resize(window, size=[size, size], antialias=True)
        return normalize(view, augment, mirror=flip), key

    return graph(batch_size=batch_size, num_threads=threads, device_id=device_id if device == "gpu" else None, seed=0,
                 prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)  # fmt: skip


def iter_train_views(
    batches: Iterable[list[Sample]],
    augment: AugmentConfig,
    *,
    seed: int,
    epoch: int,
    max_batch: int,
    threads: int = 2,
    device: str = "cpu",
    device_id: int = 0,
    skipped: Skipped | None = None,
    crop: str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(views float32 [b, 3, S, S], keys int64 [b]), one per given batch of samples (at most
    `max_batch` each), the samples that fail the checks or the decoder left out and counted in
    `skipped`; a batch left with none gives empty tensors, so that every rank yields once per batch."""
    skipped = skipped if skipped is not None else Skipped()
    graph = functools.partial(train_graph, augment, max_batch, threads, device, device_id, crop=crop)

    def feeds(keys: list[int]) -> dict[str, np.ndarray]:
        params, flip = view_draws(seed, epoch, keys)
        return {"params": params, "flip": flip}

    checked_batches = (checked(batch, skipped) for batch in batches)
    yield from decode_batches(checked_batches, graph, device, device_id, skipped, feeds)
