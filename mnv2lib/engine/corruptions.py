"""Common corruptions as in CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019).

The 15 corruptions x 5 severities of the benchmark, with the severity parameters of the
reference code (``ImageNet-C/create_c/make_cifar_c.py`` in github.com/hendrycks/robustness),
written in numpy / scipy / torch / PIL for whole batches of 32x32 images:

- noise: gaussian_noise, shot_noise, impulse_noise
- blur: defocus_blur, glass_blur, motion_blur, zoom_blur
- weather: snow, frost, fog
- digital: brightness, contrast, elastic_transform, pixelate, jpeg_compression

``corrupt(images, corruption, severity, seed)`` maps uint8 images (N, 3, 32, 32) to corrupted
uint8 images, deterministically. As in the reference, the result is ``np.uint8`` of a float
image clipped to [0, 255], i.e. truncated, not rounded.

Deviations from the reference, all deliberate:

- Random numbers come from one ``numpy.random.Generator`` per call, seeded with
  ``(seed, corruption)`` and drawn for the whole batch at once: the same distributions as the
  reference's per-image ``np.random`` calls, not the same numbers. The severity is not part of
  the seed (common random numbers): an image gets the same draws (noise field, blur angle,
  frost crop, ...) at every severity, so severities differ by their parameters only.
- motion_blur (and the streaks of snow): the reference calls ImageMagick's ``MotionBlurImage``
  through Wand. Here that kernel is re-implemented: ``2 * ceil(radius) + 1`` taps with one-sided
  Gaussian weights ``exp(-i^2 / (2 sigma^2))`` (normalized), tap i sampling the pixel at
  ``(round(i cos a), round(i sin a))`` from the output pixel, edge pixels repeated outside the
  image, the result rounded to 8 bits. Equal to ImageMagick up to its 16-bit internal rounding.
- frost: the reference blends crops of six photographs of frost (``frost1.png`` ...
  ``frost6.jpg``, downscaled by 0.2) that are not part of any package. Here five procedural frost
  "plates" (192 x 192, fixed seeds) stand in for them: fractal coverage, ridged-noise veins and
  needle crystals with 60-degree side branches, bluish white, with mean about 0.5 and standard
  deviation about 0.2 of full scale (an estimate of the photos', not a measurement). A random
  32x32 crop of a random plate is blended with the reference's weights
  ``c0 * image + c1 * frost``. Accuracy under frost is therefore comparable in kind, not in
  value, with published CIFAR-10-C frost numbers.
- glass_blur: the reference's "local pixel shuffle" visits the 30 x 30 inner pixels one by one in
  Python. Because of a numpy view its swap is in fact a copy from the up/left neighbour (see
  :func:`glass_shuffle`); that is what CIFAR-10-C holds and what is done here, as one vectorized
  gather per pass for the whole batch. The offsets are drawn, as in the reference, from
  ``randint(-1, 1)``, i.e. -1 or 0.
- elastic_transform: OpenCV's ``warpAffine`` (bilinear, reflect-101 border) and scipy's
  ``map_coordinates`` (linear, reflect) become two ``torch.nn.functional.grid_sample`` calls with
  the same borders; OpenCV quantizes sample positions to 1/32 pixel, this does not.
- brightness: skimage's rgb2hsv / hsv2rgb are re-implemented (:func:`rgb2hsv`, :func:`hsv2rgb`),
  with the same operations, so the same floats and the same truncation.
- defocus_blur: OpenCV's ``filter2D`` with the reference's anti-aliased disk kernel (a 17 x 17
  array, nonzero on at most 5 x 5) is a float64 convolution with that kernel, reflect-101 border.

Checked against the reference's own libraries (OpenCV 5.0, scikit-image 0.26, scipy 1.18) on 24
images x 5 severities: defocus_blur, zoom_blur, brightness, contrast, pixelate, jpeg_compression
and glass_blur (fed the same random draws) give the reference's uint8 images, except 1 level on
fewer than 0.03% of the values; elastic_transform (same draws) 1 level on fewer than 0.01%.

Severity and pixel change (:data:`MAE_NON_MONOTONE`): for 12 corruptions the mean absolute change
from the clean image grows with severity (motion_blur's severities 3 and 4, radius 6 vs 8 at the
same sigma 2, differ only by kernel taps weighing < 1e-9: equal change). For three the reference's
own parameters make it non-monotone, and they are kept, for comparability with CIFAR-10-C:
glass_blur, frost and elastic_transform (reasons in :data:`MAE_NON_MONOTONE`).

:func:`load_corrupted_test_set` gives a dataset's corrupted test set: the official CIFAR-10-C
``.npy`` files when present under ``<data dir>/CIFAR-10-C/``, else generated from the dataset's
test images and cached under ``paths.CACHE_DIR / "corruptions"``.
"""
from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..utils import paths
from ..utils.io import save_atomic
from .data import DatasetNotFoundError, balanced_order, torch_threads

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
CORRUPTION_FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog"),
    "digital": ("brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CACHE_VERSION = 1
OFFICIAL_FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}

_S = IMAGE_SIZE = 32  # the reference's IMSIZE: the corruptions are defined for 32x32 images
# severity parameters of make_cifar_c.py, severities 1..5
PARAMETERS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),                          # std of the noise
    "shot_noise": (500, 250, 100, 75, 50),                                      # photons at full scale
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),                            # fraction of values hit
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, alias blur
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, delta, iters
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),                # radius, sigma
    "zoom_blur": tuple(np.arange(1, end, 0.01) for end in (1.06, 1.11, 1.16, 1.21, 1.26)),  # zoom factors
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),      # image weight, frost weight
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),              # strength, wibble decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),                                  # added to HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),                                    # factor around the mean
    "elastic_transform": ((_S * 0, _S * 0, _S * 0.08), (_S * 0.05, _S * 0.2, _S * 0.07),
                          (_S * 0.08, _S * 0.06, _S * 0.06), (_S * 0.1, _S * 0.04, _S * 0.05),
                          (_S * 0.1, _S * 0.03, _S * 0.03)),                   # alpha, sigma, affine jitter
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),                                  # downscale factor
    "jpeg_compression": (80, 65, 58, 50, 40),                                   # JPEG quality
}
# where the reference's parameters make the mean absolute pixel change non-monotone in severity
MAE_NON_MONOTONE = {
    "glass_blur": "severities 1-3 copy pixels in one pass, 4-5 in two; within each group a larger blur "
                  "sigma (0.05/0.25/0.4, then 0.25/0.4) smooths the shuffled pixels back towards the "
                  "clean image, so 3 changes less than 2 and 5 less than 4",
    "frost": "the image weight falls (1, 1, 0.9, 0.85, 0.75) while the frost weight rises (0.2 ... 0.45): "
             "darkening and frost brightening cancel, so 4 and 5 change pixels less than 3; the "
             "correlation with the clean image falls monotonically",
    "elastic_transform": "the affine jitter of the control points shrinks (2.56 ... 0.96 px) while the "
                         "local elastic displacement grows (0 ... about 0.57 px rms); the global shift "
                         "dominates the pixel change, which therefore falls with severity",
}
# consecutive severities whose parameters give (nearly) the same corruption
MAE_SATURATING = {("motion_blur", 3): "radius 6 vs 8 at sigma 2: the extra kernel taps weigh < 1e-9"}
_CHUNK = 1000  # images per step (bounds the float64 temporaries)


def _check(corruption: str, severity: int) -> None:
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption: got {corruption!r}; allowed values are {CORRUPTIONS}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity: got {severity!r}; allowed values are {SEVERITIES}")


def check_dataset_images(dataset) -> None:
    """A ValueError naming ``dataset`` unless its images are 32x32, the size CIFAR-10-C's parameters are
    for: callers that train before evaluating corruptions check first, not after the training."""
    shape = tuple(dataset.test_images.shape[-2:])
    if shape != (_S, _S):
        raise ValueError(f"dataset: {dataset.name!r} has {shape[0]}x{shape[1]} images; allowed: {_S}x{_S} for the "
                         f"CIFAR-10-C corruptions (load_dataset(..., image_size={_S}) resizes them)")


def corruption_parameters(corruption: str, severity: int):
    """The reference's parameters for ``corruption`` at ``severity``."""
    _check(corruption, severity)
    return PARAMETERS[corruption][severity - 1]


def corrupt(images: torch.Tensor, corruption: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``corruption`` at ``severity`` (1-5) applied to uint8 images (N, 3, 32, 32) or (3, 32, 32);
    returns uint8 images of the same shape, deterministic given ``seed``."""
    _check(corruption, severity)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim not in (3, 4) \
            or tuple(images.shape[-3:]) != (3, _S, _S):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"images: got {getattr(images, 'dtype', None)} {shape}; allowed: a uint8 tensor "
                         "(N, 3, 32, 32) or (3, 32, 32) (CIFAR-10-C's parameters are for 32x32 images)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed: got {seed!r}; allowed values are integers")
    single = images.ndim == 3
    x = images.unsqueeze(0) if single else images
    if len(x) == 0:
        return images.clone()
    # common random numbers: the generator depends on (seed, corruption), not on the severity, so an
    # image gets the same random draws (noise field, blur angle, frost crop...) at every severity
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2 ** 63, CORRUPTIONS.index(corruption)]))
    nhwc = x.detach().cpu().permute(0, 2, 3, 1).numpy()
    fn, c = _FUNCTIONS[corruption], PARAMETERS[corruption][severity - 1]
    out = np.empty(nhwc.shape, dtype=np.uint8)
    with torch_threads(1):
        for lo in range(0, len(nhwc), _CHUNK):
            chunk = np.ascontiguousarray(nhwc[lo:lo + _CHUNK])
            result = np.asarray(fn(chunk, c, rng))
            out[lo:lo + _CHUNK] = np.clip(result, 0, 255).astype(np.uint8)  # np.uint8(...): truncation
    result = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)
    return result[0] if single else result


# ---------------------------------------------------------------------------------------------
# noise


def _gaussian_noise(x, c, rng):
    x = x / 255.0
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def _shot_noise(x, c, rng):
    x = x / 255.0
    return np.clip(rng.poisson(x * c) / c, 0, 1) * 255


def _impulse_noise(x, c, rng):
    # skimage.util.random_noise(mode="s&p", amount=c, salt_vs_pepper=0.5): each value independently
    x = x / 255.0
    flipped = rng.random(x.shape) <= c
    salted = rng.random(x.shape) <= 0.5
    x[flipped & salted] = 1.0
    x[flipped & ~salted] = 0.0
    return np.clip(x, 0, 1) * 255


# ---------------------------------------------------------------------------------------------
# blur


def _gaussian_kernel_1d(ksize: int, sigma: float) -> np.ndarray:
    """OpenCV's getGaussianKernel for sigma > 0."""
    i = np.arange(ksize) - (ksize - 1) / 2
    k = np.exp(-(i * i) / (2 * sigma * sigma))
    return k / k.sum()


@functools.lru_cache(maxsize=None)
def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The reference's ``disk``: an aliased disk (17 x 17 for radius <= 8) normalized, then
    cv2.GaussianBlur with a 3 x 3 kernel; returned cropped to its nonzero support."""
    if radius <= 8:
        L, ksize = np.arange(-8, 8 + 1), 3
    else:
        L, ksize = np.arange(-radius, radius + 1), 5
    X, Y = np.meshgrid(L, L)
    disk = ((X ** 2 + Y ** 2) <= radius ** 2).astype(np.float32)
    disk /= disk.sum()
    g = _gaussian_kernel_1d(ksize, alias_blur)
    p = ksize // 2
    padded = np.pad(disk.astype(np.float64), p, mode="reflect")  # BORDER_REFLECT_101 (zeros there anyway)
    blurred = ndimage.correlate1d(ndimage.correlate1d(padded, g, axis=0, mode="constant"), g, axis=1,
                                  mode="constant")[p:-p, p:-p]
    kernel = blurred.astype(np.float32).astype(np.float64)
    nz = np.argwhere(kernel != 0)
    r = int(np.abs(nz - (len(L) - 1) // 2).max())
    centre = (len(L) - 1) // 2
    return kernel[centre - r:centre + r + 1, centre - r:centre + r + 1]


def _filter2d_reflect101(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.filter2D per channel (correlation, BORDER_REFLECT_101 = scipy's "mirror") of NHWC images."""
    return ndimage.correlate(x, kernel[None, :, :, None], mode="mirror")


def _defocus_blur(x, c, rng):
    return np.clip(_filter2d_reflect101(x / 255.0, _disk_kernel(*c)), 0, 1) * 255


def _sk_gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """skimage.filters.gaussian(x, sigma, multichannel=True) on NHWC images (mode nearest, truncate 4)."""
    return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="nearest", truncate=4.0)


def _glass_blur(x, c, rng):
    sigma, delta, iterations = c
    x = (_sk_gaussian(x / 255.0, sigma) * 255).astype(np.uint8)
    n, h, w, _ = x.shape
    positions = len(range(h - delta, delta, -1)) * len(range(w - delta, delta, -1))
    offsets = rng.integers(-delta, delta, size=(iterations, positions, 2, n))  # (dx, dy) in [-delta, delta)
    shuffled = glass_shuffle(x, offsets, delta)
    return np.clip(_sk_gaussian(shuffled / 255.0, sigma), 0, 1) * 255


def glass_shuffle(x: np.ndarray, offsets: np.ndarray, delta: int = 1) -> np.ndarray:
    """The reference's "local pixel shuffle", for every image at once. ``x``: (N, H, W, C);
    ``offsets``: (passes, positions, 2, N) integer (dx, dy) per position (in the reference's loop
    order: rows, then columns, from the bottom right up to (delta + 1, delta + 1)) and image.

    The reference writes ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on a numpy array, where
    ``x[h, w]`` is a view: the right-hand side's second item already holds the new value when it is
    assigned, so the "swap" is a copy, ``x[h, w] = x[h', w']``. CIFAR-10-C was made that way, and
    that is what this does. With delta = 1 (all CIFAR severities) the sources (dx, dy in {-1, 0})
    are visited after their targets, so a pass is one gather; other deltas run the sequential loop
    (vectorized over the batch)."""
    n, h, w, ch = x.shape
    rows = np.arange(h - delta, delta, -1)
    cols = np.arange(w - delta, delta, -1)
    images = np.arange(n)
    x = x.copy()
    for offsets_pass in offsets:
        dx = offsets_pass[:, 0, :].reshape(len(rows), len(cols), n).transpose(2, 0, 1)
        dy = offsets_pass[:, 1, :].reshape(len(rows), len(cols), n).transpose(2, 0, 1)
        if delta == 1:
            src = x[images[:, None, None], rows[None, :, None] + dy, cols[None, None, :] + dx]
            x[images[:, None, None], rows[None, :, None], cols[None, None, :]] = src
        else:
            for a, r in enumerate(rows):
                for b, q in enumerate(cols):
                    x[images, r, q] = x[images, r + dy[:, a, b], q + dx[:, a, b]]
    return x


def motion_blur_kernel(radius: float, sigma: float, angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ImageMagick's MotionBlurImage kernel (radius > 0): the weights of its 2 * ceil(radius) + 1
    taps, and the x and y offsets (pixels) each tap samples, relative to the output pixel."""
    if not radius > 0 or not sigma > 0:
        raise ValueError(f"radius, sigma: got {radius!r}, {sigma!r}; allowed values are numbers > 0")
    i = np.arange(int(2 * math.ceil(radius) + 1), dtype=np.float64)
    weights = np.exp(-(i * i) / (2 * sigma * sigma))
    a = math.radians(angle)
    ox = np.ceil(i * math.cos(a) - 0.5).astype(np.int64)  # (ssize_t) ceil(i * cos a - 0.5)
    oy = np.ceil(i * math.sin(a) - 0.5).astype(np.int64)
    return weights / weights.sum(), ox, oy


def _motion_blur_batch(x: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick-style motion blur of NHWC float images (0-255), one angle per image, rounded."""
    n, h, w, ch = x.shape
    weights, _, _ = motion_blur_kernel(radius, sigma, 0.0)
    i = np.arange(len(weights), dtype=np.float64)
    a = np.radians(angles)[:, None]
    ox = np.ceil(i[None] * np.cos(a) - 0.5).astype(np.int64)  # (n, taps)
    oy = np.ceil(i[None] * np.sin(a) - 0.5).astype(np.int64)
    ys, xs = np.arange(h), np.arange(w)
    flat = x.reshape(n, h * w, ch)
    out = np.zeros((n, h * w, ch), dtype=np.float64)
    for t in range(len(weights)):
        rows = np.clip(ys[None, :] + oy[:, t:t + 1], 0, h - 1)  # (n, h): edge pixels repeat
        cols = np.clip(xs[None, :] + ox[:, t:t + 1], 0, w - 1)
        index = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, h * w, 1)
        out += weights[t] * np.take_along_axis(flat, index, axis=1)
    return np.clip(np.rint(out), 0, 255).reshape(n, h, w, ch)


def _motion_blur(x, c, rng):
    radius, sigma = c
    angles = rng.uniform(-45, 45, size=len(x))
    return _motion_blur_batch(x.astype(np.float64), radius, sigma, angles)


@functools.lru_cache(maxsize=None)
def _zoom_matrix(h: int, zoom_factor: float) -> np.ndarray:
    """The reference's clipped_zoom along one axis (centre crop of ceil(h / z) pixels, scipy zoom
    with order 1, centre trim to h) as an (h, h) interpolation matrix."""
    ch = int(np.ceil(h / zoom_factor))
    top = (h - ch) // 2
    out = int(round(ch * zoom_factor))
    trim = (out - h) // 2
    scale = (ch - 1) / (out - 1) if out > 1 else 0.0
    m = np.zeros((h, h))
    for o in range(h):
        s = (trim + o) * scale
        i0 = min(int(math.floor(s)), ch - 1)
        f = s - i0
        m[o, top + i0] += 1 - f
        if f > 0 and i0 + 1 < ch:
            m[o, top + i0 + 1] += f
    return m


def _clipped_zoom(x: np.ndarray, zoom_factor: float) -> np.ndarray:
    """clipped_zoom of (N, H, W, C) images (H == W), in x's dtype."""
    n, h, w, ch = x.shape
    m = torch.from_numpy(_zoom_matrix(h, float(zoom_factor))).to(_TORCH_DTYPES[x.dtype])
    planes = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).reshape(n * ch, h, w)
    out = m @ planes @ m.T
    return out.reshape(n, ch, h, w).permute(0, 2, 3, 1).numpy()


_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def _zoom_blur(x, c, rng):
    n, h, w, ch = x.shape
    planes = torch.from_numpy((x / 255.0).astype(np.float32).transpose(0, 3, 1, 2).copy()).reshape(n * ch, h, w)
    out = torch.zeros_like(planes)
    for z in c:
        m = torch.from_numpy(_zoom_matrix(h, float(z))).to(torch.float32)
        out += m @ planes @ m.T
    x = ((planes + out) / (len(c) + 1)).reshape(n, ch, h, w).permute(0, 2, 3, 1).numpy()
    return np.clip(x, 0, 1) * 255


# ---------------------------------------------------------------------------------------------
# weather


def _snow(x, c, rng):
    n, h, w, _ = x.shape
    x = x.astype(np.float32) / 255.0
    layer = rng.normal(size=(n, h, w), loc=c[0], scale=c[1])
    layer = _clipped_zoom(layer[..., None], c[2])[..., 0]
    layer[layer < c[3]] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8).astype(np.float64)
    angles = rng.uniform(-135, -45, size=n)
    layer = _motion_blur_batch(layer[..., None], c[4], c[5], angles) / 255.0  # (n, h, w, 1)
    gray = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]  # cv2 RGB2GRAY
    x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
    return np.clip(x + layer + np.rot90(layer, k=2, axes=(1, 2)), 0, 1) * 255


def _plasma_fractal(n: int, rng, mapsize: int = 32, wibbledecay: float = 3) -> np.ndarray:
    """The reference's diamond-square height map, for n maps at once; each in [0, 1]."""
    m = np.zeros((n, mapsize, mapsize))
    stepsize, wibble = mapsize, 100.0

    def wibbledmean(array):
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        corner = m[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        square = corner + np.roll(corner, shift=-1, axis=1)
        square = square + np.roll(square, shift=-1, axis=2)
        m[:, half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(square)
        dr = m[:, half:mapsize:stepsize, half:mapsize:stepsize]
        ul = m[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        lt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=2)
        m[:, 0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(lt)
        tt = dr + np.roll(dr, 1, axis=2) + ul + np.roll(ul, -1, axis=1)
        m[:, half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(tt)
        stepsize //= 2
        wibble /= wibbledecay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


def _fog(x, c, rng):
    n, h, w, _ = x.shape
    x = x / 255.0
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + c[0] * _plasma_fractal(n, rng, wibbledecay=c[1])[:, :h, :w, None]
    return np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255


FROST_PLATES = 5
FROST_PLATE_SIZE = 192


@functools.lru_cache(maxsize=None)
def frost_plate(index: int, size: int = FROST_PLATE_SIZE) -> np.ndarray:
    """Procedural stand-in for the reference's frost photographs: (size, size, 3) float in 0-255.

    Fractal coverage (blurred noise at three scales) decides where frost is thick; ridged noise
    draws thin veins; needle crystals (random segments with side branches at +-60 degrees) give
    the sharp bright structure; the result is bluish white with mean ~0.5 and std ~0.2 of full scale.
    """
    rng = np.random.default_rng([20190506, index])
    s = size

    def band(sigma):
        b = ndimage.gaussian_filter(rng.standard_normal((s, s)), sigma, mode="wrap")
        return (b - b.mean()) / (b.std() + 1e-12)

    coverage = 1 / (1 + np.exp(-1.6 * (band(24) + 0.5 * band(10) + 0.25 * band(5))))
    veins = sum(a * np.clip(1 - 2.2 * np.abs(band(sg)), 0, 1) ** 3 for sg, a in ((3.0, 1.0), (1.5, 0.7), (0.8, 0.5)))
    needles = np.zeros((s, s))
    count = int(0.012 * s * s)
    starts = rng.uniform(0, s, size=(count, 2))
    angles = rng.integers(0, 6, size=count) * (math.pi / 3) + rng.normal(0, 0.12, size=count)
    lengths = rng.uniform(4, 22, size=count)
    strength = rng.uniform(0.4, 1.0, size=count)

    def draw(p0, angle, length, value):
        t = np.linspace(0, length, max(2, int(2 * length)))
        ys = (p0[0] + t * math.sin(angle)).astype(np.int64) % s
        xs = (p0[1] + t * math.cos(angle)).astype(np.int64) % s
        np.maximum.at(needles, (ys, xs), value * (1 - 0.5 * t / length))

    for p0, angle, length, value in zip(starts, angles, lengths, strength):
        draw(p0, angle, length, value)
        for frac in rng.uniform(0.2, 0.9, size=rng.integers(1, 4)):
            root = p0 + frac * length * np.array([math.sin(angle), math.cos(angle)])
            for side in (-1, 1):
                draw(root, angle + side * math.pi / 3, length * rng.uniform(0.2, 0.45), value * 0.8)
    needles = ndimage.gaussian_filter(needles, 0.55, mode="wrap") * 2.2
    frost = 0.25 * coverage + coverage * (0.45 * veins / 2.2 + 0.8 * np.clip(needles, 0, 1))
    frost = (frost - frost.mean()) / (frost.std() + 1e-12) * 0.2 + 0.5
    tint = np.array([0.86, 0.93, 1.0])
    rgb = np.clip(frost[..., None] * tint + 0.04, 0, 1)
    return rgb * 255


def _frost(x, c, rng):
    n, h, w, _ = x.shape
    plates = np.stack([frost_plate(i) for i in range(FROST_PLATES)])
    idx = rng.integers(FROST_PLATES, size=n)
    ys = rng.integers(0, FROST_PLATE_SIZE - h, size=n)
    xs = rng.integers(0, FROST_PLATE_SIZE - w, size=n)
    rows = (ys[:, None] + np.arange(h))[:, :, None]
    cols = (xs[:, None] + np.arange(w))[:, None, :]
    frost = plates[idx[:, None, None], rows, cols]  # (n, h, w, 3)
    return np.clip(c[0] * x.astype(np.float64) + c[1] * frost, 0, 255)


# ---------------------------------------------------------------------------------------------
# digital


def rgb2hsv(rgb: np.ndarray) -> np.ndarray:
    """skimage.color.rgb2hsv, vectorized, same operations (so the same floats)."""
    out = np.empty_like(rgb)
    v = rgb.max(-1)
    delta = np.ptp(rgb, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = delta / v
        s[delta == 0.0] = 0.0
        h = np.zeros_like(v)
        for channel, shift, (a, b) in ((0, 0.0, (1, 2)), (1, 2.0, (2, 0)), (2, 4.0, (0, 1))):
            idx = rgb[..., channel] == v
            h[idx] = shift + (rgb[..., a][idx] - rgb[..., b][idx]) / delta[idx]
        h = (h / 6.0) % 1.0
        h[delta == 0.0] = 0.0
    out[..., 0], out[..., 1], out[..., 2] = h, s, v
    out[np.isnan(out)] = 0
    return out


def hsv2rgb(hsv: np.ndarray) -> np.ndarray:
    """skimage.color.hsv2rgb, vectorized, same operations."""
    hi = np.floor(hsv[..., 0] * 6)
    f = hsv[..., 0] * 6 - hi
    p = hsv[..., 2] * (1 - hsv[..., 1])
    q = hsv[..., 2] * (1 - f * hsv[..., 1])
    t = hsv[..., 2] * (1 - (1 - f) * hsv[..., 1])
    v = hsv[..., 2]
    hi = hi.astype(np.int64) % 6
    # skimage: np.choose(hi, [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)])
    candidates = np.stack([v, t, p, q], axis=-1)
    table = np.array([[0, 1, 2], [3, 0, 2], [2, 0, 1], [2, 3, 0], [1, 2, 0], [0, 2, 3]])
    return np.take_along_axis(candidates, table[hi], axis=-1)


def _brightness(x, c, rng):
    x = rgb2hsv(x / 255.0)
    x[..., 2] = np.clip(x[..., 2] + c, 0, 1)
    return np.clip(hsv2rgb(x), 0, 1) * 255


def _contrast(x, c, rng):
    x = x / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """cv2.getAffineTransform for a batch: (n, 3, 2) point sets -> (n, 2, 3) matrices src -> dst."""
    n = len(src)
    a = np.concatenate([src, np.ones((n, 3, 1))], axis=2)  # (n, 3, 3)
    return np.linalg.solve(a, dst).transpose(0, 2, 1)


def _elastic_transform(x, c, rng):
    n, h, w, _ = x.shape
    jitter = rng.uniform(-c[2], c[2], size=(n, 3, 2)).astype(np.float32)
    fields = rng.uniform(-1, 1, size=(2, n, h, w))
    return elastic_apply(x, c, jitter, fields)


def elastic_apply(x: np.ndarray, c: tuple, jitter: np.ndarray, fields: np.ndarray) -> np.ndarray:
    """The reference's elastic_transform of uint8 NHWC images with given random draws: ``jitter``
    (N, 3, 2) moves the three affine control points (pixels), ``fields`` (2, N, H, W) uniform(-1, 1)
    noise becomes the (dx, dy) displacement after Gaussian smoothing (sigma c[1]) and scaling (c[0]).
    Returns float images in [0, 255]."""
    n, h, w, ch = x.shape
    image = torch.from_numpy(x.astype(np.float32) / 255.0).permute(0, 3, 1, 2).to(torch.float64)
    # random affine (OpenCV's points are (x, y)); warpAffine samples the source at M^-1 (destination)
    centre = np.float32([h, w]) // 2
    square = min(h, w) // 3
    pts1 = np.float32([centre + square, [centre[0] + square, centre[1] - square], centre - square])
    pts2 = pts1[None] + np.asarray(jitter, dtype=np.float32)
    m = _affine_from_points(np.repeat(pts1[None], n, 0).astype(np.float64), pts2.astype(np.float64))
    full = np.concatenate([m, np.tile([[[0.0, 0.0, 1.0]]], (n, 1, 1))], axis=1)
    inv = np.linalg.inv(full)[:, :2]  # (n, 2, 3)
    gy, gx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    src_x = inv[:, 0, 0, None, None] * gx + inv[:, 0, 1, None, None] * gy + inv[:, 0, 2, None, None]
    src_y = inv[:, 1, 0, None, None] * gx + inv[:, 1, 1, None, None] * gy + inv[:, 1, 2, None, None]
    grid = torch.from_numpy(np.stack([2 * src_x / (w - 1) - 1, 2 * src_y / (h - 1) - 1], axis=-1))
    # align_corners=True + reflection: mirrored about the edge pixels' centres = BORDER_REFLECT_101
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    # elastic displacement: smoothed uniform noise (skimage gaussian, mode reflect, truncate 3)
    if c[1] > 0:
        fields = ndimage.gaussian_filter(fields, sigma=(0, 0, c[1], c[1]), mode="reflect", truncate=3)
    dx, dy = (np.asarray(fields) * c[0]).astype(np.float32).astype(np.float64)
    sx, sy = gx + dx, gy + dy
    # align_corners=False + reflection: mirrored about the image border = scipy's mode "reflect"
    grid = torch.from_numpy(np.stack([(2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1], axis=-1))
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return np.clip(image.permute(0, 2, 3, 1).numpy(), 0, 1) * 255


def _pixelate(x, c, rng):
    from PIL import Image

    side = int(_S * c)
    out = np.empty_like(x)
    for i, im in enumerate(x):
        small = Image.fromarray(im).resize((side, side), Image.Resampling.BOX)
        out[i] = np.asarray(small.resize((x.shape[2], x.shape[1]), Image.Resampling.BOX))
    return out


def _jpeg_compression(x, c, rng):
    from PIL import Image

    out = np.empty_like(x)
    for i, im in enumerate(x):
        buffer = io.BytesIO()
        Image.fromarray(im).save(buffer, "JPEG", quality=c)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return out


_FUNCTIONS = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur, "zoom_blur": _zoom_blur,
    "snow": _snow, "frost": _frost, "fog": _fog, "brightness": _brightness, "contrast": _contrast,
    "elastic_transform": _elastic_transform, "pixelate": _pixelate, "jpeg_compression": _jpeg_compression,
}


# ---------------------------------------------------------------------------------------------
# corrupted test sets


def official_dir(dataset_name: str, near: str | os.PathLike | None = None) -> Path | None:
    """The first ``CIFAR-10-C`` (CIFAR-100-C for "cifar100") folder holding ``labels.npy``: next to
    ``near`` (a dataset's source folder) first, then in ``$MNV2_DATA_DIR`` and ``data/``; or None."""
    folder = OFFICIAL_FOLDERS.get(dataset_name)
    if folder is None:
        return None
    candidates = ([Path(near).parent] if near else []) + paths.data_search_dirs()
    for d in dict.fromkeys(candidates):
        if (d / folder / "labels.npy").is_file():
            return d / folder
    return None


def load_corrupted_test_set(dataset, corruption: str, severity: int, size: int | None = None, *, seed: int = 0,
                            official: bool | None = None, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (n, 3, 32, 32), labels int64 (n,))``: the test set under ``corruption`` at
    ``severity``, n = ``size`` (None: the whole test split).

    Generated (``official=False``, or no official files): the first ``size`` test images of
    ``dataset`` (its splits are class-interleaved, so a prefix is class-balanced) corrupted with
    :func:`corrupt` and ``seed``; cached in ``paths.CACHE_DIR / "corruptions"`` keyed by the dataset
    name, a hash of those test images and labels, the corruption, severity and seed.

    Official (``official=None`` and the files exist, or ``official=True``): the CIFAR-10-C arrays
    ``<data dir>/CIFAR-10-C/<corruption>.npy`` (50,000 = 5 severities x 10,000 images, in CIFAR-10's
    test order) and ``labels.npy``, for a dataset named "cifar10" (CIFAR-100-C likewise). When the
    dataset was read from torchvision's files its test images are the official ones, and the
    corrupted images are exactly its first ``size`` test images, corrupted. Otherwise (e.g. the JPEG
    ImageFolder copy, whose files cannot be matched to the official order) a class-balanced subset
    of ``size`` official images is taken (deterministic given ``seed``) with the official labels: the
    same test distribution, but not the same images as the clean test split.
    """
    _check(corruption, severity)
    check_dataset_images(dataset)
    n_test = len(dataset.test_labels)
    source = getattr(dataset, "source", None)
    found = official_dir(dataset.name, source if source and Path(str(source)).is_dir() else None) \
        if official is not False else None
    if official and found is None:
        where = OFFICIAL_FOLDERS.get(dataset.name, "CIFAR-10-C")
        raise DatasetNotFoundError(
            f"official: no official corrupted files for dataset {dataset.name!r}; put {where}/<corruption>.npy and "
            f"{where}/labels.npy in one of " + ", ".join(str(d) for d in paths.data_search_dirs())
            + f" (set {paths.DATA_ENV_VAR} to move the first), or use official=False to generate them")
    if found is not None and (found / f"{corruption}.npy").is_file():
        return _official_set(dataset, found, corruption, severity, size, seed)
    if official:
        raise DatasetNotFoundError(f"official: {found / (corruption + '.npy')} is missing")
    size = _check_size(size, n_test, "the dataset's test split")
    images, labels = dataset.test_images[:size], dataset.test_labels[:size]
    if not cache:
        return corrupt(images, corruption, severity, seed), labels
    digest = hashlib.blake2b(digest_size=8)
    digest.update(repr((CACHE_VERSION, dataset.name, tuple(images.shape))).encode())
    digest.update(np.ascontiguousarray(images.cpu().numpy()).tobytes())
    digest.update(np.ascontiguousarray(labels.cpu().numpy()).tobytes())
    folder = paths.CACHE_DIR / "corruptions" / f"{dataset.name}-n{size}-{digest.hexdigest()}-seed{seed}"
    path = folder / f"{corruption}-{severity}.pt"
    if path.exists():
        try:
            stored = torch.load(path, weights_only=True)
            if stored.shape == images.shape and stored.dtype == torch.uint8:
                return stored, labels
        except Exception as error:  # a partial or foreign file: make it again
            warnings.warn(f"corruption cache {path} unreadable ({error}); generating it again")
    corrupted = corrupt(images, corruption, severity, seed)
    save_atomic(corrupted, path)
    return corrupted, labels


def _check_size(size, available: int, what: str) -> int:
    """``size`` (None: all), at most ``available``: a larger size (e.g. the "full" profile's 10,000 on
    the 5,000-image JPEG copy) is cut to what there is, with a warning."""
    if size is None:
        return available
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size: got {size!r}; allowed values are None or integers >= 1")
    if size > available:
        warnings.warn(f"size: asked for {size} images, {what} has {available}; using {available}", UserWarning,
                      stacklevel=3)
        return available
    return int(size)


def _official_set(dataset, folder: Path, corruption: str, severity: int, size, seed: int):
    array = np.load(folder / f"{corruption}.npy", mmap_mode="r")
    all_labels = np.load(folder / "labels.npy", mmap_mode="r")
    per = len(all_labels) // len(SEVERITIES)  # 10,000 in the official files
    if len(array) != len(all_labels) or per * len(SEVERITIES) != len(all_labels) or array.shape[1:] != (_S, _S, 3):
        raise ValueError(f"official: {folder / (corruption + '.npy')} holds {array.shape} and labels.npy "
                         f"{len(all_labels)} labels; expected (5 x n, 32, 32, 3) images and 5 x n labels "
                         "(severity 1 first)")
    lo, hi = (severity - 1) * per, severity * per
    labels = torch.from_numpy(np.asarray(all_labels[lo:hi]).astype(np.int64))
    source = Path(str(getattr(dataset, "source", "")))
    indices = getattr(dataset, "test_indices", None)
    # images read from torchvision's files are in the official test order: the same images
    same_images = (source.name in ("cifar-10-batches-py", "cifar-100-python") and indices is not None
                   and len(indices) == len(dataset.test_labels) and int(torch.as_tensor(indices).max()) < per)
    size = _check_size(size, len(dataset.test_labels) if same_images else per,
                       "the dataset's test split" if same_images else f"{folder} (per severity)")
    if same_images:
        idx = torch.as_tensor(indices[:size], dtype=torch.int64)
        if not torch.equal(labels[idx], dataset.test_labels[:size].cpu()):
            warnings.warn(f"{folder}: labels.npy disagrees with the dataset's test labels; using the official labels")
    else:
        idx = balanced_order(labels, size, seed=seed, field="size")
    order = np.argsort(idx.numpy())
    images = np.empty((len(idx), _S, _S, 3), dtype=np.uint8)
    images[order] = array[lo:hi][idx.numpy()[order]]  # sorted reads from the memory map
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels[idx]


def evaluate_corruptions(model, dataset, corruptions=None, severities=(1, 2, 3, 4, 5), size: int = 10000,
                         batch_size: int = 500, device="cpu", channels_last: bool = False) -> dict[str, dict[str, float]]:
    """Accuracy per corruption and severity (CIFAR-10-C protocol) on the first ``size`` images of each
    corrupted test set; ``corruptions`` None: all 15."""
    from .train import evaluate, folded_for_inference

    check_dataset_images(dataset)
    inference = folded_for_inference(model)  # once for the 75 sets (an eval-mode copy, or the model itself)
    results: dict[str, dict[str, float]] = {}
    for corruption in corruptions or CORRUPTIONS:
        results[corruption] = {}
        for severity in severities:
            images, labels = load_corrupted_test_set(dataset, corruption, severity, size=size)
            results[corruption][str(severity)] = evaluate(inference, images, labels, dataset.mean, dataset.std,
                                                          batch_size, device, channels_last)["accuracy"]
    return results
