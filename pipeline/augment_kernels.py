"""Compiled CPU kernels for the three views: the random resized crop, colour jitter + grayscale, and Gaussian blur.

They run inside DALI's CPU pipeline as DALI operators (`augment_ops.py`), on DALI's worker
threads without the GIL. Two reasons to own them rather than use DALI's CPU
`random_resized_crop`, `color_twist` and `gaussian_blur`:

- fidelity, given the same random draws (tests/unit/pipeline/test_augment_kernels.py):
  - `random_resized_crop` is torchvision's RandomResizedCrop on a PIL image: its window
    sampler in its float32 precision, then PIL's fixed-point antialiased bilinear resize,
    bit-exact with the Pillow of the SLIP reference (Pillow 13 sometimes runs the vertical
    pass first, which moves a pixel by one level);
  - `color_jitter` is torchvision's ColorJitter on a PIL image (the four adjustments in a
    random order per sample, contrast blended towards the mean luma, hue shifted in 8-bit
    HSV, every step truncated to 8 bits as PIL's ImageEnhance does), then RandomGrayscale,
    bit-exact;
  - `gaussian_blur` is a sampled Gaussian; the reference's PIL blur is a box approximation
    of it, within a level on average;
- speed: DALI's CPU versions take 2-3x longer per 224 px view on 2 cores (BENCHMARKS.md).

Every kernel takes uint8 HWC images with 3 channels and writes into a caller-owned output.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3  # torchvision's ColorJitter op ids

_ZERO, _ONE, _MAX8 = np.float32(0.0), np.float32(1.0), np.float32(255.0)


@njit(cache=True, nogil=True, inline="always")
def _store8(v: np.float32) -> np.float32:
    # What PIL keeps of a blend: the float clipped to [0, 255] and truncated to an integer.
    return np.float32(np.int32(min(max(v, _ZERO), _MAX8)))


@njit(cache=True, nogil=True, inline="always")
def _luma(r: np.float32, g: np.float32, b: np.float32) -> np.float32:
    # PIL's RGB -> "L": ITU-R 601-2 weights in 16.16 fixed point, rounded.
    return np.float32((np.int32(r) * 19595 + np.int32(g) * 38470 + np.int32(b) * 7471 + 0x8000) >> 16)


# The kernels below work on planes (three float32 [n] arrays holding 8-bit values) because loops over
# contiguous planes vectorise; over interleaved RGB bytes they stay scalar and are 5x slower.


@njit(cache=True, nogil=True)
def _brightness(planes: np.ndarray, f: np.float32) -> None:
    for c in range(3):
        x = planes[c]
        for j in range(x.size):
            x[j] = _store8(f * x[j])


@njit(cache=True, nogil=True)
def _contrast(planes: np.ndarray, f: np.float32) -> None:
    r, g, b = planes[0], planes[1], planes[2]
    total = 0
    for j in range(r.size):
        total += np.int64(_luma(r[j], g[j], b[j]))
    mean = np.float32(int(total / r.size + 0.5))  # PIL: int(ImageStat mean of "L" + 0.5)
    for c in range(3):
        x = planes[c]
        for j in range(x.size):
            x[j] = _store8(mean + f * (x[j] - mean))


@njit(cache=True, nogil=True)
def _saturation(planes: np.ndarray, f: np.float32) -> None:
    r, g, b = planes[0], planes[1], planes[2]
    for j in range(r.size):
        lum = _luma(r[j], g[j], b[j])
        r[j] = _store8(lum + f * (r[j] - lum))
        g[j] = _store8(lum + f * (g[j] - lum))
        b[j] = _store8(lum + f * (b[j] - lum))


@njit(cache=True, nogil=True)
def _hue(planes: np.ndarray, shift: int) -> None:
    # PIL's RGB -> HSV with 8-bit H, S, V; H += shift modulo 256; PIL's HSV -> RGB. Written
    # with selects instead of branches so that it vectorises.
    rs, gs, bs = planes[0], planes[1], planes[2]
    for j in range(rs.size):
        r, g, b = rs[j], gs[j], bs[j]
        maxc = max(r, max(g, b))
        cr = maxc - min(r, min(g, b))
        crs = max(cr, _ONE)
        # PIL's precision, step for step (a cheaper reciprocal moves 0.5% of hues by one step):
        # float32 quotients, the hue in double, stored as float32, wrapped and scaled in double.
        rc, gc, bc = (maxc - r) / crs, (maxc - g) / crs, (maxc - b) / crs
        h = 4.0 + np.float64(gc) - np.float64(rc)
        h = 2.0 + np.float64(rc) - np.float64(bc) if g == maxc else h
        h = np.float64(bc) - np.float64(gc) if r == maxc else h
        h = np.float64(np.float32(h)) / 6.0 + 1.0
        h = np.float64(np.float32(h - np.float64(np.int64(h))))  # fmod(h, 1) for the positive h here
        uh = (np.int32(h * 255.0) + shift) & 255
        us = np.int32(np.float64(cr / max(maxc, _ONE)) * 255.0)
        hf = uh * 6.0 / 255.0
        i = np.int32(hf)
        f = np.float32(hf - i)
        fs = np.float32(us / 255.0)
        p = np.float32(np.int32(maxc * (1.0 - fs) + 0.5))
        q = np.float32(np.int32(maxc * (1.0 - fs * f) + 0.5))  # fs * f: a float32 product in PIL
        t = np.float32(np.int32(maxc * (1.0 - fs * (1.0 - f)) + 0.5))
        v = maxc
        nr = v if (i == 0) | (i == 5) | (i == 6) else (q if i == 1 else (p if (i == 2) | (i == 3) else t))
        ng = t if (i == 0) | (i == 6) else (v if (i == 1) | (i == 2) else (q if i == 3 else p))
        nb = p if (i == 0) | (i == 1) | (i == 6) else (t if i == 2 else (v if (i == 3) | (i == 4) else q))
        grey_in, grey_out = cr == 0, us == 0  # a grey pixel keeps its value; zero saturation gives V
        rs[j] = r if grey_in else (v if grey_out else nr)
        gs[j] = g if grey_in else (v if grey_out else ng)
        bs[j] = b if grey_in else (v if grey_out else nb)


@njit(cache=True, nogil=True)
def color_jitter(out: np.ndarray, img: np.ndarray, factors: np.ndarray, order: np.ndarray, jitter: bool, gray: bool) -> None:
    """out = grayscale?(jitter?(img)), uint8 (H, W, 3).

    factors: brightness, contrast, saturation (multipliers) and hue (fraction of the colour
    wheel, as torchvision's hue_factor); order: the four op ids in the order to apply them.
    """
    n = img.shape[0] * img.shape[1]
    src = img.reshape(n * 3)
    dst = out.reshape(n * 3)
    planes = np.empty((3, n), dtype=np.float32)  # (3, H*W)
    for j in range(n):
        planes[0, j], planes[1, j], planes[2, j] = src[3 * j], src[3 * j + 1], src[3 * j + 2]
    if jitter:
        for op in order:
            if op == BRIGHTNESS:
                _brightness(planes, np.float32(factors[BRIGHTNESS]))
            elif op == CONTRAST:
                _contrast(planes, np.float32(factors[CONTRAST]))
            elif op == SATURATION:
                _saturation(planes, np.float32(factors[SATURATION]))
            else:
                # numpy's float -> uint8 cast truncates towards zero and wraps, as torchvision's
                # adjust_hue does to hue_factor * 255 for a PIL image.
                _hue(planes, int(factors[HUE] * 255.0) & 255)
    if gray:
        for j in range(n):
            planes[0, j] = planes[1, j] = planes[2, j] = _luma(planes[0, j], planes[1, j], planes[2, j])
    for j in range(n):
        dst[3 * j], dst[3 * j + 1], dst[3 * j + 2] = np.uint8(planes[0, j]), np.uint8(planes[1, j]), np.uint8(planes[2, j])


@njit(cache=True, nogil=True)
def gaussian_kernel(sigma: float) -> np.ndarray:
    """float32 [2r+1], r = ceil(3 sigma): the sampled Gaussian, summing to 1."""
    r = max(1, int(math.ceil(3.0 * sigma)))
    k = np.empty(2 * r + 1, dtype=np.float32)
    total = 0.0
    for i in range(2 * r + 1):
        k[i] = math.exp(-0.5 * (i - r) * (i - r) / (sigma * sigma))
        total += k[i]
    for i in range(2 * r + 1):
        k[i] /= total
    return k


@njit(cache=True, nogil=True, inline="always")
def _reflect101(i: int, n: int) -> int:
    # Mirror about the edge pixel without repeating it (OpenCV's BORDER_REFLECT_101).
    if n == 1:
        return 0
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * n - 2 - i
    return i


@njit(cache=True, nogil=True)
def gaussian_blur(out: np.ndarray, img: np.ndarray, sigma: float) -> None:
    """Separable Gaussian blur of a uint8 (H, W, C) image, reflect-101 borders, rounded."""
    h, w, c = img.shape
    k = gaussian_kernel(sigma)
    r = (len(k) - 1) // 2
    wc = w * c
    src = img.reshape(h, wc)
    dst = out.reshape(h, wc)
    padded = np.empty((w + 2 * r) * c, dtype=np.float32)  # one row with its mirrored borders
    rows = np.empty((h, wc), dtype=np.float32)  # after the horizontal pass
    acc = np.empty(wc, dtype=np.float32)
    for y in range(h):
        row = src[y]
        for x in range(-r, w + r):
            xs = _reflect101(x, w)
            for ch in range(c):
                padded[(x + r) * c + ch] = row[xs * c + ch]
        out_row = rows[y]
        # The inner loops run over contiguous memory so that LLVM vectorises them.
        for j in range(wc):
            out_row[j] = k[0] * padded[j]
        for i in range(1, 2 * r + 1):
            ki = k[i]
            off = i * c
            for j in range(wc):
                out_row[j] += ki * padded[off + j]
    for y in range(h):
        for j in range(wc):
            acc[j] = 0.0
        for i in range(2 * r + 1):
            ki = k[i]
            above = rows[_reflect101(y + i - r, h)]
            for j in range(wc):
                acc[j] += ki * above[j]
        d = dst[y]
        for j in range(wc):
            d[j] = np.uint8(min(max(acc[j] + 0.5, 0.0), 255.0))


# --- RandomResizedCrop: torchvision's window sampler, then PIL's bilinear resize -------------

_PRECISION_BITS = 22  # PIL's fixed point for 8-bit resampling: 32 - 8 - 2


@njit(cache=True, nogil=True, inline="always")
def _torch_uniform(u: float, lo: float, hi: float) -> float:
    # torch's uniform_ on a float32 tensor: lo + u * (hi - lo), all in float32.
    lo32, hi32 = np.float32(lo), np.float32(hi)
    return float(np.float32(np.float32(u) * (hi32 - lo32) + lo32))


@njit(cache=True, nogil=True)
def crop_window(height: int, width: int, u: np.ndarray, scale: tuple, ratio: tuple) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop.get_params draws it, in its float32
    precision. u: 40 uniforms in [0, 1): per attempt (10) the area, the log-ratio, the top
    and the left."""
    area = height * width
    log_lo, log_hi = np.float32(math.log(np.float32(ratio[0]))), np.float32(math.log(np.float32(ratio[1])))
    for attempt in range(10):
        target = area * _torch_uniform(u[4 * attempt], scale[0], scale[1])
        aspect = float(np.float32(math.exp(_torch_uniform(u[4 * attempt + 1], log_lo, log_hi))))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[4 * attempt + 2] * (height - h + 1)), height - h)
            left = min(int(u[4 * attempt + 3] * (width - w + 1)), width - w)
            return top, left, h, w
    # No attempt fitted: the largest centred window whose ratio is within the range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@njit(cache=True, nogil=True)
def _bilinear_coeffs(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's precompute_coeffs + normalize_coeffs_8bpc for its BILINEAR filter: per output
    pixel, the first input pixel and tap count (int64 [out, 2]) and fixed-point taps (int32)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # antialiasing: the filter widens when shrinking
    support = filterscale
    inverse = 1.0 / filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.empty((out_size, 2), dtype=np.int64)
    taps = np.zeros((out_size, ksize), dtype=np.int32)
    weights = np.empty(ksize, dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - xmin
        total = 0.0
        for x in range(count):
            t = abs((x + xmin - center + 0.5) * inverse)
            weights[x] = 1.0 - t if t < 1.0 else 0.0
            total += weights[x]
        for x in range(count):
            k = weights[x] / total if total != 0.0 else weights[x]
            taps[xx, x] = int(0.5 + k * (1 << _PRECISION_BITS))
        bounds[xx, 0], bounds[xx, 1] = xmin, count
    return bounds, taps


@njit(cache=True, nogil=True, inline="always")
def _clip8(acc: np.int32) -> np.uint8:
    v = acc >> _PRECISION_BITS
    return np.uint8(0 if v < 0 else (255 if v > 255 else v))


@njit(cache=True, nogil=True)
def resize_bilinear(out: np.ndarray, img: np.ndarray) -> None:
    """PIL's Image.resize(BILINEAR) of uint8 (h, w, 3) `img` into (H, W, 3) `out`, bit-exact:
    the horizontal pass (over the rows the vertical pass needs), rounded to 8 bits, then the
    vertical pass. Each pass runs over contiguous rows so that it vectorises."""
    h, w, _ = img.shape
    oh, ow, _ = out.shape
    vbounds, vtaps = _bilinear_coeffs(h, oh)
    first = vbounds[0, 0]
    rows = vbounds[oh - 1, 0] + vbounds[oh - 1, 1] - first
    half = np.int32(1 << (_PRECISION_BITS - 1))
    if ow != w:
        hbounds, htaps = _bilinear_coeffs(w, ow)
        columns = np.empty((w, rows * 3), dtype=np.int32)  # the needed rows, transposed
        for y in range(rows):
            for x in range(w):
                for c in range(3):
                    columns[x, y * 3 + c] = img[first + y, x, c]
        acc = np.empty(rows * 3, dtype=np.int32)
        narrowed = np.empty((ow, rows * 3), dtype=np.uint8)  # (ow, rows*3)
        for xx in range(ow):
            acc[:] = half
            for t in range(hbounds[xx, 1]):
                k = htaps[xx, t]
                src = columns[hbounds[xx, 0] + t]
                for j in range(rows * 3):
                    acc[j] += src[j] * k
            for j in range(rows * 3):
                narrowed[xx, j] = _clip8(acc[j])
        tmp = np.empty((rows, ow * 3), dtype=np.int32)
        for xx in range(ow):
            for y in range(rows):
                for c in range(3):
                    tmp[y, xx * 3 + c] = narrowed[xx, y * 3 + c]
    else:
        tmp = np.empty((rows, ow * 3), dtype=np.int32)
        for y in range(rows):
            for x in range(ow):
                for c in range(3):
                    tmp[y, x * 3 + c] = img[first + y, x, c]
    dst = out.reshape(oh, ow * 3)
    if oh == h:
        for y in range(oh):
            for j in range(ow * 3):
                dst[y, j] = np.uint8(tmp[y, j])
        return
    acc = np.empty(ow * 3, dtype=np.int32)
    for yy in range(oh):
        acc[:] = half
        for t in range(vbounds[yy, 1]):
            k = vtaps[yy, t]
            src = tmp[vbounds[yy, 0] - first + t]
            for j in range(ow * 3):
                acc[j] += src[j] * k
        for j in range(ow * 3):
            dst[yy, j] = _clip8(acc[j])


@njit(cache=True, nogil=True)
def random_resized_crop(out: np.ndarray, img: np.ndarray, u: np.ndarray, scale: tuple, ratio: tuple) -> None:
    """torchvision's RandomResizedCrop on a PIL image: crop_window, then resize_bilinear."""
    top, left, h, w = crop_window(img.shape[0], img.shape[1], u, scale, ratio)
    resize_bilinear(out, img[top : top + h, left : left + w])
