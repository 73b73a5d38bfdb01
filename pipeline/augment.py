"""The three-view DALI graph: one decode per image, the CLIP crop and two SimCLR views.

Parameters follow SLIP's reference transforms (torchvision): CLIP crop = RandomResizedCrop
(scale 0.5-1); SimCLR views = RandomResizedCrop (0.08-1), colour jitter 0.4/0.4/0.4/0.1 with
p=0.8, grayscale p=0.2, Gaussian blur sigma 0.1-2 with p=0.5, horizontal flip; all normalised
with the ImageNet mean and std. The SimCLR views may be smaller than the CLIP view
(`ssl_image_size`); their blur is then scaled to cover the same fraction of their side.
Random choices are DALI conditionals, so an augmentation that is not drawn for a sample is
not computed for it.

On `device="cpu"` the crops, colour jitter, grayscale and blur are compiled kernels
(`pipeline/augment_kernels.py`) run as DALI operators (`pipeline/augment_ops.py`). Given the
same random draws, the crops and the jitter + grayscale are bit-exact with torchvision's
transforms on a PIL image as the SLIP reference ran them (its Pillow's resize), and the
kernels are 2-3x faster on 2 cores than DALI's own CPU operators.
On `device="gpu"` they are DALI's `random_resized_crop`, `color_twist` and `gaussian_blur`,
which differ from torchvision in three respects: color_twist pivots contrast at 128 where
torchvision pivots on the image's mean grey; it folds brightness, contrast, saturation and hue
(rotated in YIQ, not HSV) into one colour matrix applied at once, without torchvision's
random order and its clamping to 8 bits after each adjustment; and the resize's antialiasing
filter is DALI's. The ranges and probabilities are the same on both devices. The GPU decoder
upsamples chroma as libjpeg-turbo does on the CPU (`jpeg_fancy_upsampling`), so both graphs
start from the same pixels; `hw_decoder_load` is the share of JPEGs sent to the GPU's
hardware decoder (the rest decode on CUDA cores and CPU threads). For bf16 training the GPU
graph can emit fp16 views (`half`): half the bytes DALI holds per batch, and autocast reads
them as readily.
"""
from __future__ import annotations

from collections.abc import Callable

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import Pipeline

from pipeline import augment_ops
from pipeline.augment_config import VIEWS, AugmentConfig, ssl_side
from pipeline.autograph_files import forget_generated_files


def normalize(
    view: DataNode, cfg: AugmentConfig, mirror: DataNode | int = 0, crop: tuple[int, int] | None = None, half: bool = False
) -> DataNode:
    """uint8 HWC -> float32 (fp16 with `half`) CHW with the mean/std of `cfg`, optionally flipped and center-cropped."""
    return fn.crop_mirror_normalize(
        view,
        mirror=mirror,
        crop=crop,
        mean=[255 * m for m in cfg.mean],
        std=[255 * s for s in cfg.std],
        dtype=types.FLOAT16 if half else types.FLOAT,
        output_layout="CHW",
    )


def decode(jpegs: DataNode, device: str, hw_decoder_load: float = 0.65) -> DataNode:
    """RGB images from encoded ones: nvJPEG on the GPU ("mixed"), libjpeg-turbo on the CPU."""
    if device == "gpu":
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load, jpeg_fancy_upsampling=True)
    return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)


def _random_resized_crop(decoded: DataNode, cfg: AugmentConfig, scale: tuple[float, float], size: int, device: str) -> DataNode:
    if device == "gpu":
        return fn.random_resized_crop(decoded, size=[size] * 2, random_area=list(scale), random_aspect_ratio=list(cfg.ratio))
    # torchvision's window sampler and PIL's bilinear resize, as the SLIP reference crops.
    ranges = fn.constant(fdata=[*scale, *cfg.ratio], shape=[4], dtype=types.FLOAT)
    params = fn.cat(fn.random.uniform(range=[0, 1], shape=[40]), ranges)  # (44,) per sample
    return augment_ops.random_resized_crop(decoded, params, size)


def _clip_view(decoded: DataNode, cfg: AugmentConfig, device: str, half: bool) -> DataNode:
    return normalize(_random_resized_crop(decoded, cfg, cfg.clip_scale, cfg.image_size, device), cfg, half=half)


def _ssl_blur_sigma(cfg: AugmentConfig) -> tuple[float, float]:
    """blur_sigma is in pixels of a view of image_size: a smaller SimCLR view is blurred by the
    same fraction of its side."""
    side = ssl_side(cfg)
    return cfg.blur_sigma if side == cfg.image_size else tuple(s * side / cfg.image_size for s in cfg.blur_sigma)


def _uniform(lo: float, hi: float) -> DataNode:
    if lo == hi:  # DALI rejects an empty range; a pinned value is a constant
        return fn.constant(fdata=[lo], shape=[1], dtype=types.FLOAT)
    return fn.random.uniform(range=[lo, hi], shape=[1])  # (1,) per sample


def _jitter_ranges(cfg: AugmentConfig) -> list[tuple[float, float]]:
    """torchvision's ColorJitter factor ranges: brightness, contrast, saturation, hue."""
    brightness, contrast, saturation, hue = cfg.jitter
    return [(max(0.0, 1 - x), 1 + x) for x in (brightness, contrast, saturation)] + [(-hue, hue)]


def _factor(lo: float, hi: float) -> DataNode | float:
    return lo if lo == hi else fn.random.uniform(range=[lo, hi])


def _flag(coin: DataNode) -> DataNode:
    return fn.reshape(fn.cast(coin, dtype=types.FLOAT), shape=[1])


def _ssl_colour_cpu(view: DataNode, cfg: AugmentConfig) -> DataNode:
    jitter = fn.random.coin_flip(probability=cfg.jitter_p)
    gray = fn.random.coin_flip(probability=cfg.grayscale_p)
    if jitter | gray:
        # The order is the argsort of iid keys in [0, 1). As torchvision does, an adjustment
        # whose jitter is 0 is not applied at all (hue by 0 would still round-trip HSV): its
        # key is 1, which the kernel skips.
        keys = [_uniform(0.0, 1.0) if x > 0 else _uniform(1.0, 1.0) for x in cfg.jitter]
        params = fn.cat(  # (10,) per sample
            *(_uniform(lo, hi) for lo, hi in _jitter_ranges(cfg)), *keys, _flag(jitter), _flag(gray)
        )
        view = augment_ops.color_jitter(view, params)
    if fn.random.coin_flip(probability=cfg.blur_p):
        view = augment_ops.gaussian_blur(view, _uniform(*_ssl_blur_sigma(cfg)))
    return view


def _ssl_colour_gpu(view: DataNode, cfg: AugmentConfig) -> DataNode:
    (b_lo, b_hi), (c_lo, c_hi), (s_lo, s_hi), (h_lo, h_hi) = _jitter_ranges(cfg)
    if fn.random.coin_flip(probability=cfg.jitter_p):
        # torchvision's hue factor is a fraction of the colour wheel; DALI's is in degrees.
        view = fn.color_twist(
            view,
            brightness=_factor(b_lo, b_hi),
            contrast=_factor(c_lo, c_hi),
            saturation=_factor(s_lo, s_hi),
            hue=_factor(360 * h_lo, 360 * h_hi),
        )
    if fn.random.coin_flip(probability=cfg.grayscale_p):
        # Zero saturation keeps the luma (0.299 R + 0.587 G + 0.114 B) in all three channels.
        view = fn.color_twist(view, saturation=0.0)
    if fn.random.coin_flip(probability=cfg.blur_p):
        view = fn.gaussian_blur(view, sigma=_factor(*_ssl_blur_sigma(cfg)))
    return view


def _ssl_view(decoded: DataNode, cfg: AugmentConfig, device: str, half: bool) -> DataNode:
    view = _random_resized_crop(decoded, cfg, cfg.ssl_scale, ssl_side(cfg), device)
    view = _ssl_colour_gpu(view, cfg) if device == "gpu" else _ssl_colour_cpu(view, cfg)
    return normalize(view, cfg, mirror=fn.random.coin_flip(probability=cfg.flip_p), half=half)


def three_view_pipeline(source: Callable, views: tuple[str, ...], cfg: AugmentConfig, **kwargs) -> Pipeline:
    """`three_view_graph`, built: DALI's threads (and on the GPU, its CUDA state) start here."""
    pipe = three_view_graph(source, views, cfg, **kwargs)
    pipe.build()
    return pipe


def three_view_graph(
    source: Callable,
    views: tuple[str, ...],
    cfg: AugmentConfig,
    *,
    batch_size: int,
    num_threads: int,
    device: str = "cpu",
    device_id: int | None = 0,
    seed: int = 0,
    prefetch: int = 2,
    source_workers: int = 0,
    checkpoint: bytes | None = None,
    half: bool = False,
    hw_decoder_load: float = 0.65,
) -> Pipeline:
    """The pipeline, defined but not built, whose outputs are (index, *views) for the views asked
    for: the CLIP view ("image") of cfg.image_size, the SimCLR views of cfg.ssl_image_size (or
    image_size), with their blur scaled to their side. A GPU graph defined with device_id=None can be serialised (its operators checked
    against DALI's schemas) on a machine without CUDA.

    `source(batch_info)` returns (list of encoded JPEG arrays, int64 [b, 1] indices); the
    index rides through DALI so that host-side fields stay aligned with prefetching. With
    `source_workers` > 0 it runs in that many spawned processes (DALI's parallel external
    source), which then read ahead of the decoder; it must be picklable. `checkpoint` is what
    `Pipeline.checkpoint()` returned: the new pipeline continues that one's random draws and
    iteration count exactly.
    """
    unknown = set(views) - set(VIEWS)
    if unknown or not views:
        raise ValueError(f"views must be a non-empty subset of {VIEWS}, got {views}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got '{device}'")

    @pipeline_def(enable_conditionals=True)
    def graph():
        parallel = {"parallel": True, "prefetch_queue_depth": max(prefetch, source_workers)} if source_workers else {}
        # Each worker prepares whole batches; the queue depth is what lets several work at once.
        jpegs, index = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True, **parallel)
        decoded = decode(jpegs, device, hw_decoder_load)
        built = {
            "image": (lambda: _clip_view(decoded, cfg, device, half)),
            "aug1": (lambda: _ssl_view(decoded, cfg, device, half)),
            "aug2": (lambda: _ssl_view(decoded, cfg, device, half)),
        }
        return (index, *(built[v]() for v in VIEWS if v in views))

    pipe = graph(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id if device == "gpu" else None,  # each rank decodes on its own GPU
        seed=seed,
        prefetch_queue_depth=prefetch,
        # The dynamic executor never reuses an output buffer that something still references,
        # so the loader can hand DALI's memory to torch without a copy.
        exec_dynamic=True,
        # Random states ride in checkpoints, so a resumed run draws what the straight run drew.
        enable_checkpointing=True,
        checkpoint=checkpoint,
        # Spawned, not forked: the parent may hold CUDA, DALI and torch threads by now.
        **({"py_num_workers": source_workers, "py_start_method": "spawn"} if source_workers > 0 else {}),
    )
    forget_generated_files()  # the conditionals' converted sources, written to the temp directory
    return pipe
