"""The compiled CPU kernels of `augment_kernels.py` as DALI operators (DALI's numba plugin).

Each operator runs its kernel per sample on DALI's CPU threads, without the GIL. Making one
compiles its C callbacks, which takes about 3 s, so each is made once per process and then
called in every graph that needs it.
"""
from __future__ import annotations

from functools import cache

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import do_not_convert
from nvidia.dali.plugin.numba.experimental import NumbaFunction

from pipeline import augment_kernels

# The run and setup functions below are compiled by numba, not called from Python. DALI's
# conditionals rewrite functions called inside a graph, so they live at module level or
# come from a factory marked do_not_convert.


def _same_shape(outs, ins):  # each output sample has its input's shape
    for i in range(len(outs[0])):
        for d in range(len(ins[0][i])):
            outs[0][i][d] = ins[0][i][d]


def _crop_run(out, img, params):
    # params: 40 uniforms for the window sampler's 10 attempts, then scale and ratio ranges.
    augment_kernels.random_resized_crop(out, img, params[:40], (params[40], params[41]), (params[42], params[43]))


def _jitter_run(out, img, params):
    # params: brightness, contrast, saturation, hue factors; four order keys (1 = not applied);
    # jitter?; gray?
    keys = params[4:8]
    order = np.argsort(keys)
    augment_kernels.color_jitter(out, img, params[0:4], order[keys[order] < 1.0], params[8] > 0.5, params[9] > 0.5)


def _blur_run(out, img, sigma):
    augment_kernels.gaussian_blur(out, img, sigma[0])


def _operator(run_fn, setup_fn) -> NumbaFunction:
    return NumbaFunction(
        run_fn=run_fn,
        setup_fn=setup_fn,
        in_types=[types.UINT8, types.FLOAT],
        out_types=[types.UINT8],
        ins_ndim=[3, 1],  # an HWC image and a vector of per-sample parameters
        outs_ndim=[3],
    )


@cache
@do_not_convert
def _crop_operator(size: int) -> NumbaFunction:
    def setup(outs, ins):  # every output sample is size x size x 3
        for i in range(len(outs[0])):
            outs[0][i][0] = size
            outs[0][i][1] = size
            outs[0][i][2] = 3

    return _operator(_crop_run, setup)


@cache
def _same_shape_operator(run_fn) -> NumbaFunction:
    return _operator(run_fn, _same_shape)


def _hwc(node: DataNode) -> DataNode:
    return fn.reshape(node, layout="HWC")  # metadata only: a conditional's branches must agree on layout


def random_resized_crop(decoded: DataNode, params: DataNode, size: int) -> DataNode:
    """uint8 [size, size, 3] per sample; params float32 [44]: 40 uniforms, scale, ratio."""
    return _hwc(_crop_operator(size)(decoded, params))


def color_jitter(view: DataNode, params: DataNode) -> DataNode:
    """params float32 [10]: brightness, contrast, saturation, hue; 4 order keys (an op whose key
    is 1 is skipped); jitter?; gray?"""
    return _hwc(_same_shape_operator(_jitter_run)(view, params))


def gaussian_blur(view: DataNode, sigma: DataNode) -> DataNode:
    """sigma float32 [1] per sample, in pixels of the view."""
    return _hwc(_same_shape_operator(_blur_run)(view, sigma))
