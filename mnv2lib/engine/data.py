"""Datasets as in-memory uint8 tensors, and batching with augmentation on tensors.

``load_dataset(name)`` gives a :class:`Dataset`: every image decoded once into a uint8 tensor
``(N, 3, H, W)`` with int64 labels, per-channel mean and std of the training images, and a
description for figure captions. Sources:

- ``"cifar10"`` / ``"cifar100"``: looked for, in order, in ``$MNV2_DATA_DIR`` then ``data/``
  (:func:`mnv2lib.utils.paths.data_search_dirs`), in torchvision's format (``cifar-10-batches-py/``,
  ``cifar-100-python/``) or in ImageFolder layout (``cifar10/{train,test}/<class>/*.jpg|png``);
  when missing, torchvision downloads it into ``data/`` (never with ``MNV2_OFFLINE=1``).
- ``"synthetic"``: a built-in procedural 10-class 32x32 dataset (see :func:`make_synthetic`),
  for tests and offline demos. It is *not* CIFAR.
- ``"auto"``: CIFAR-10 when found locally, else synthetic with a loud notice; never downloads.
- a path to any ImageFolder tree with ``train/`` and ``test/`` (at least two classes).

Images of an ImageFolder tree are decoded once (JPEGs with torchvision's libjpeg-turbo decoder,
other formats with PIL, in threads) into 8-bit RGB (16-bit images keep their high byte, alpha is
dropped) and cached under ``paths.CACHE_DIR / "images"``, keyed on every file's name, size and
mtime; later loads read the cached tensors (a cache that cannot be written or read is worked
around, with a warning). A file that is damaged (truncated, a PNG with less pixel data than its
header says, a header claiming more than PIL's ``Image.MAX_IMAGE_PIXELS``), unreadable or a
broken or looping symbolic link is a ``ValueError`` naming it.

Image size: ``image_size=None`` keeps the images as they are (one size per dataset). ``image_size=N``
gives N x N images: each image of another size is resized with torchvision's ``Resize(N)`` +
``CenterCrop(N)`` (shorter side to N, antialiased bilinear, then the centre), which also admits an
ImageFolder of mixed sizes. A resized dataset says so in its ``description`` and its ``name``
(``<name>-40x40-to-32x32``, ``<name>-mixed-to-32x32``), so runs on it get their own keys; a dataset
already N x N is returned unchanged. The workbook's models and the CIFAR-10-C corruptions expect
32x32 (:data:`IMAGE_SIZE`).

Split order: every split is returned in *class-interleaved* order (the k-th image of each class,
in a seeded random order within the class, then the (k+1)-th...), so any prefix of a split is as
class-balanced as possible. ``train_size`` / ``test_size`` take such a prefix: a class-balanced
subset, deterministic given ``seed``. ``Dataset.train_indices`` / ``test_indices`` give the position
of each image in the source split (file order for ImageFolder, array order for torchvision's files).

:class:`BatchLoader` iterates ``(normalized float images, labels)`` batches straight from the uint8
tensors: seeded shuffle, random crop with 4-pixel zero padding and horizontal flip, all vectorized
over the batch and done on the target device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import math
import os
import pickle
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import paths
from ..utils.io import save_atomic
from ..utils.progress import progress as _progress

DATASETS = ("auto", "cifar10", "cifar100", "synthetic")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SYNTHETIC_CLASSES = ("disk", "ring", "square", "frame", "triangle", "plus", "stripes", "checker", "pair", "crescent")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".webp", ".tif", ".tiff")
CACHE_VERSION = 2  # 2: keyed on every file's size and mtime (1: folder mtimes only; a replaced JPEG kept its pixels)
IMAGE_SIZE = 32  # the side the workbook's models, profiles and CIFAR-10-C corruptions are made for
_CACHE_FIELDS = ("images", "labels", "classes", "hist", "jpeg_quality", "kinds")

_TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
# IJG standard luminance quantization table (natural order), for estimating a JPEG copy's quality
_IJG_LUMINANCE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.float64)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is neither on disk nor downloadable; the message says where to put it."""


class DatasetIntegrityError(ValueError):
    """A CIFAR file in torchvision's (pickle) format is not the published one: it is never unpickled,
    since unpickling runs whatever code the file names."""


@dataclass(eq=False, repr=False)
class Dataset:
    """Train and test images as uint8 tensors (N, 3, H, W) with int64 labels.

    ``mean`` / ``std``: per-channel statistics of ``train_images`` in [0, 1] units.
    ``description``: what the data is, for figure captions. ``source``: where it came from.
    """

    name: str
    description: str
    classes: tuple[str, ...]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    train_indices: torch.Tensor | None = field(default=None)
    test_indices: torch.Tensor | None = field(default=None)
    # images held out of training for learning curves (see split_validation); None: none
    validation_images: torch.Tensor | None = field(default=None, repr=False)
    validation_labels: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def __repr__(self) -> str:
        mean = ", ".join(f"{m:.4f}" for m in self.mean)
        std = ", ".join(f"{s:.4f}" for s in self.std)
        return (f"Dataset({self.name!r}, {self.description!r}: {len(self.train_labels)} train / "
                f"{len(self.test_labels)} test images {tuple(self.image_shape)}, {self.num_classes} classes, "
                f"mean ({mean}), std ({std}), source {self.source!r})")


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads (restored after). For many small tensor ops
    OpenMP barriers cost more than they save, badly so on a CPU shared with other jobs."""
    old = torch.get_num_threads()
    if old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------
# normalization and statistics


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (N, C, H, W) or (C, H, W) -> float32 ``(x / 255 - mean) / std``, per channel,
    on the images' device (memory format kept)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images: got dtype {images.dtype}; allowed: torch.uint8")
    scale, shift = _affine(mean, std, images.device)
    shape = (-1, 1, 1)
    return images.to(torch.float32).mul_(scale.view(shape)).add_(shift.view(shape))


def _affine(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_uint8 * scale + shift == (x / 255 - mean) / std``."""
    mean = torch.as_tensor(mean, dtype=torch.float64)
    std = torch.as_tensor(std, dtype=torch.float64)
    if mean.ndim != 1 or mean.shape != std.shape:
        raise ValueError(f"mean/std: got shapes {tuple(mean.shape)} and {tuple(std.shape)}; "
                         "allowed: two sequences with one value per channel")
    if not bool((std > 0).all()):
        raise ValueError(f"std: got {std.tolist()}; allowed: values > 0")
    scale = (1.0 / (255.0 * std)).to(torch.float32).to(device)
    shift = (-mean / std).to(torch.float32).to(device)
    return scale, shift


def _histograms(images: torch.Tensor) -> torch.Tensor:
    """Per-channel 256-bin histograms (C, 256) int64 of uint8 images (N, C, H, W)."""
    return torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256) for c in range(images.shape[1])])


def _stats_from_histograms(hist: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    values = torch.arange(256, dtype=torch.float64) / 255.0
    hist = hist.to(torch.float64)
    count = hist.sum(1)
    mean = (hist * values).sum(1) / count
    var = (hist * (values - mean[:, None]) ** 2).sum(1) / count
    return tuple(float(m) for m in mean), tuple(float(s) for s in var.sqrt())


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 images, in [0, 1] units."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images: got {images.dtype} {tuple(images.shape)}; allowed: uint8 (N, C, H, W)")
    return _stats_from_histograms(_histograms(images.cpu()))


# ---------------------------------------------------------------------------------------------
# class-balanced, class-interleaved order


def balanced_order(labels: torch.Tensor, size: int | None = None, seed: int = 0, field: str = "size") -> torch.Tensor:
    """Indices into ``labels``: a seeded random order within each class, interleaved across classes
    (rank 0 of every class, then rank 1, ...), cut to ``size``. Any prefix is as class-balanced as
    the classes allow; with the same ``seed`` a smaller size is a prefix of a larger one."""
    labels = torch.as_tensor(labels).to(torch.int64).cpu()
    n = len(labels)
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= n):
        raise ValueError(f"{field}: got {size!r}; allowed values are None (all) or integers 1..{n}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    shuffled = labels[perm]
    # rank of each element within its class, in the shuffled order
    by_class = torch.argsort(shuffled * n + torch.arange(n), stable=True)
    counts = torch.bincount(shuffled)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.int64)
    rank[by_class] = torch.arange(n) - starts[shuffled[by_class]]
    order = perm[torch.argsort(rank * (int(labels.max()) + 1 if n else 1) + shuffled, stable=True)]
    return order if size is None else order[: int(size)]


def validation_as_test(dataset: "Dataset", size: int, seed: int = 0) -> "Dataset":
    """A copy of ``dataset`` whose test set is ``size`` class-balanced images held out of its
    training set (and removed from it): for choosing recipes without ever looking at test images.
    (Learning curves keep the test set and add validation images instead: :func:`split_validation`.)"""
    order = balanced_order(dataset.train_labels, None, seed=seed, field="size")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size < len(order):
        raise ValueError(f"size: got {size!r}; allowed values are integers 1..{len(order) - 1} "
                         "(fewer than the training images)")
    held, kept = order[:size], order[size:].sort().values
    train_images = dataset.train_images[kept]
    mean, std = channel_stats(train_images)
    return Dataset(dataset.name, f"{dataset.description}, validation split of {size} training images",
                   dataset.classes, train_images, dataset.train_labels[kept], dataset.train_images[held],
                   dataset.train_labels[held], mean, std, source=dataset.source)


# ---------------------------------------------------------------------------------------------
# synthetic data


def split_validation(dataset: "Dataset", train_size: int) -> "Dataset":
    """``dataset`` loaded with ``train_size`` + V training images, as the dataset loaded with ``train_size``
    (the same images, statistics and identity: a class-balanced subset of a size is the prefix of a larger
    one's) whose other V images are its validation set, for learning curves that never look at the test
    images."""
    n = len(dataset.train_labels)
    if isinstance(train_size, bool) or not isinstance(train_size, (int, np.integer)) or not 1 <= train_size < n:
        raise ValueError(f"train_size: got {train_size!r}; allowed: integers 1..{n - 1} (fewer than the {n} "
                         "training images loaded)")
    train = dataset.train_images[:train_size]
    mean, std = channel_stats(train)
    indices = dataset.train_indices
    return dataclasses.replace(
        dataset, train_images=train, train_labels=dataset.train_labels[:train_size], mean=mean, std=std,
        train_indices=None if indices is None else indices[:train_size],
        validation_images=dataset.train_images[train_size:], validation_labels=dataset.train_labels[train_size:])


def make_synthetic(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` procedural 32x32 RGB images of 10 shape/texture families and their labels.

    Classes (:data:`SYNTHETIC_CLASSES`): disk, ring, filled square, square frame, triangle, plus,
    striped disk, checkered square, pair of dots, crescent; each rotated, scaled (radius 6-11 px)
    and placed at random, in a random colour with a minimum contrast to a random background that
    has a colour gradient, three distractor line segments in random colours, and pixel noise.
    Colour, position and brightness carry no class information, so a linear classifier or a
    nearest-centroid classifier on pixels does poorly, while a small CNN learns the shapes.
    Labels are interleaved (0, 1, ..., 9, 0, ...), so every prefix is class-balanced.
    Deterministic given ``(size, seed)``, and ``make_synthetic(m, seed)`` is a prefix of
    ``make_synthetic(n, seed)`` for m <= n. 6,000 images take about a second.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size: got {size!r}; allowed values are integers >= 1")
    size, chunk = int(size), _SYNTHETIC_CHUNK
    images = torch.empty(size, 3, 32, 32, dtype=torch.uint8)
    with torch_threads(1):  # small elementwise ops: threads only add barrier waits on a busy machine
        for start in range(0, size, chunk):
            count = min(chunk, size - start)
            # always a whole chunk (then cut): the draws, so the images, do not depend on ``size``
            images[start:start + count] = _synthetic_chunk(chunk, start // chunk, int(seed))[:count]
    return images, torch.arange(size) % len(SYNTHETIC_CLASSES)


_SYNTHETIC_CHUNK = 250  # images drawn per generator; keeps temporaries small (and prefixes equal)


def _synthetic_chunk(n: int, index: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + index) * 7919 + 17)
    side = 32

    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    labels = torch.arange(n) % len(SYNTHETIC_CLASSES)  # chunks start at multiples of 10
    coords = torch.arange(side, dtype=torch.float32) + 0.5
    yy, xx = coords.view(1, side, 1), coords.view(1, 1, side)

    # background: random colour + linear gradient + distractor segments
    bg = u(n, 3, 1, 1, lo=0.1, hi=0.9)
    angle_g = u(n, 1, 1, hi=2 * math.pi)
    ramp = ((xx - 16) * torch.cos(angle_g) + (yy - 16) * torch.sin(angle_g)) / 16  # (n, 32, 32) in about [-1.4, 1.4]
    image = bg + u(n, 3, 1, 1, lo=-0.15, hi=0.15) * ramp.unsqueeze(1)
    for _ in range(3):
        p0 = u(n, 2, hi=side)
        p1 = p0 + u(n, 2, lo=-14, hi=14)
        d = _segment_distance(xx, yy, p0, p1)
        alpha = (1.2 - d).clamp(0, 1).unsqueeze(1) * u(n, 1, 1, 1, lo=0.3, hi=0.8)
        image = image * (1 - alpha) + u(n, 3, 1, 1) * alpha

    # the shape: local coordinates, rotated and scaled
    radius = u(n, 1, 1, lo=6.0, hi=11.0)
    cx = u(n, 1, 1, lo=-1, hi=1) * (16 - radius) + 16
    cy = u(n, 1, 1, lo=-1, hi=1) * (16 - radius) + 16
    theta = u(n, 1, 1, hi=2 * math.pi)
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    cu = dx * torch.cos(theta) + dy * torch.sin(theta)
    cv = -dx * torch.sin(theta) + dy * torch.cos(theta)
    mask = torch.zeros(n, side, side)
    freq = u(n, 1, 1, lo=2.2, hi=3.2) * math.pi
    for k in range(len(SYNTHETIC_CLASSES)):
        sel = labels == k
        if bool(sel.any()):
            mask[sel] = _shape_mask(k, cu[sel], cv[sel], freq[sel])
    # soften the edges a little (3x3 box on the 0/1 mask, mixed with the hard mask)
    soft = F.avg_pool2d(mask.unsqueeze(1), 3, stride=1, padding=1, count_include_pad=False)
    mask = (0.5 * mask.unsqueeze(1) + 0.5 * soft)

    # foreground colour: random, at least 0.35 away from the background in mean intensity
    fg = u(n, 3, 1, 1)
    gap = fg.mean(1, keepdim=True) - bg.mean(1, keepdim=True)
    push = torch.where(gap.abs() < 0.35, torch.where(bg.mean(1, keepdim=True) > 0.5, -0.45, 0.45), 0.0)
    fg = (fg + push).clamp(0, 1)
    image = image * (1 - mask) + fg * mask
    image = image + 0.06 * torch.randn(n, 3, side, side, generator=g)
    return (image.clamp_(0, 1) * 255).round_().to(torch.uint8)


def _segment_distance(xx, yy, p0, p1) -> torch.Tensor:
    """Distance from every pixel centre to the segment p0-p1, per image: (n, H, W)."""
    x0, y0 = p0[:, 0].view(-1, 1, 1), p0[:, 1].view(-1, 1, 1)
    ex, ey = (p1[:, 0] - p0[:, 0]).view(-1, 1, 1), (p1[:, 1] - p0[:, 1]).view(-1, 1, 1)
    t = (((xx - x0) * ex + (yy - y0) * ey) / (ex * ex + ey * ey + 1e-6)).clamp(0, 1)
    return torch.sqrt((xx - x0 - t * ex) ** 2 + (yy - y0 - t * ey) ** 2)


def _shape_mask(k: int, u: torch.Tensor, v: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    r = torch.sqrt(u * u + v * v)
    box = torch.maximum(u.abs(), v.abs())
    if k == 0:  # disk
        m = r < 1
    elif k == 1:  # ring
        m = (r < 1) & (r > 0.58)
    elif k == 2:  # filled square
        m = box < 0.8
    elif k == 3:  # square frame
        m = (box < 0.85) & (box > 0.5)
    elif k == 4:  # triangle (vertices on the unit circle)
        s3 = math.sqrt(3.0)
        m = (v > -0.5) & (s3 * u + v < 1) & (-s3 * u + v < 1)
    elif k == 5:  # plus
        m = ((u.abs() < 0.28) & (v.abs() < 1)) | ((v.abs() < 0.28) & (u.abs() < 1))
    elif k == 6:  # disk filled with stripes
        m = (r < 1) & (torch.sin(u * freq) > 0)
    elif k == 7:  # checkered square
        m = (box < 0.9) & (torch.sin(u * freq) * torch.sin(v * freq) > 0)
    elif k == 8:  # pair of dots
        m = (((u - 0.55) ** 2 + v * v) < 0.16) | (((u + 0.55) ** 2 + v * v) < 0.16)
    else:  # crescent
        m = (r < 1) & (((u - 0.45) ** 2 + v * v) > 0.64)
    return m.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# loading


def load_dataset(name: str | os.PathLike = "auto", *, train_size: int | None = None, test_size: int | None = None,
                 seed: int = 0, root: str | os.PathLike | None = None, download: bool | None = None,
                 progress: bool = True, image_size: int | None = None) -> Dataset:
    """Load a dataset as in-memory uint8 tensors (see the module docstring).

    name: "cifar10", "cifar100", "synthetic", "auto", or the path of an ImageFolder tree with
    ``train/`` and ``test/``. train_size / test_size: class-balanced subsets (None = all; for
    "synthetic": how many images to generate, default 5,000 / 1,000). seed: which subset (for
    "synthetic": the generation seed). root: a folder to look in (and download into) instead of
    ``$MNV2_DATA_DIR`` then ``data/``. download: let torchvision download missing CIFAR (None: unless
    the environment sets ``MNV2_OFFLINE=1``). progress: progress bars and messages. image_size: N
    gives N x N images, resizing those of another size (None: as they are; see the module docstring).
    """
    if download is not None and not isinstance(download, bool):
        raise ValueError(f"download: got {download!r}; allowed values are None, True and False")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))
                                   or image_size < 1):
        raise ValueError(f"image_size: got {image_size!r}; allowed values are None (keep the size) or integers >= 1")
    image_size = None if image_size is None else int(image_size)
    search = [Path(root).expanduser().resolve()] if root is not None else paths.data_search_dirs()
    target = search[0] if root is not None else paths.DATA_DIR
    folder = check_dataset_name(name)
    if folder is not None:
        return _from_imagefolder(folder, folder.name.lower(), train_size, test_size, seed, progress, image_size)
    name = name.lower()
    if name == "synthetic":
        return _to_size(_synthetic(train_size, test_size, seed), image_size)
    if name == "auto":
        found = _find_cifar("cifar10", search)
        if found is None:
            message = ("NOTICE: CIFAR-10 was not found in " + ", ".join(str(d) for d in search)
                       + f"; using the SYNTHETIC procedural dataset instead. Results are NOT CIFAR-10. "
                       f"Set {paths.DATA_ENV_VAR} to a folder holding cifar10/ or cifar-10-batches-py/ "
                       "(or load_dataset('cifar10') to download it).")
            warnings.warn(message, UserWarning, stacklevel=2)
            print(message, flush=True)
            return _to_size(_synthetic(train_size, test_size, seed), image_size)
        name = "cifar10"
    found = _find_cifar(name, search)
    if found is None:
        from ..models.pretrained import OFFLINE_ENV_VAR, downloads_allowed

        reason = "download=False"
        if download is None:  # as for pretrained weights: the environment decides unless the caller does
            download = downloads_allowed()
            reason = f"downloads are switched off: {OFFLINE_ENV_VAR}={os.environ.get(OFFLINE_ENV_VAR)}"
        if download:
            try:
                _download(name, target, progress)
            except Exception as error:  # no network, proxy, disk, ...: say where to put the files
                reason = f"download failed: {type(error).__name__}: {error}"
            found = _find_cifar(name, [target])
        if found is None:
            raise DatasetNotFoundError(_missing_message(name, search, reason))
    kind, folder = found
    if kind == "imagefolder":
        return _from_imagefolder(folder, name, train_size, test_size, seed, progress, image_size)
    return _to_size(_from_torchvision(name, folder, train_size, test_size, seed), image_size)


def check_dataset_name(name) -> Path | None:
    """The ImageFolder tree ``name`` names (None for a built-in name); an error, without loading
    anything, when ``name`` is neither (the report runner checks before starting any kernel)."""
    if isinstance(name, os.PathLike) or (isinstance(name, str) and name.lower() not in DATASETS
                                          and (os.sep in name or "/" in name or Path(name).expanduser().exists())):
        folder = Path(name).expanduser().resolve()
        missing = [s for s in ("train", "test") if not (folder / s).is_dir()]
        if missing:
            raise DatasetNotFoundError(f"dataset: {str(folder)!r} is not an ImageFolder tree: it has no "
                                       f"{' or '.join(s + '/' for s in missing)} folder (expected "
                                       f"{folder}/train/<class>/*.jpg|png and {folder}/test/<class>/*.jpg|png)")
        return folder
    if not isinstance(name, str) or name.lower() not in DATASETS:
        raise ValueError(f"dataset: got {name!r}; allowed values are {DATASETS} or the path of an ImageFolder "
                         "tree with train/ and test/")
    return None


def _missing_message(name: str, search: list[Path], reason: str) -> str:
    pretty, tv = _PRETTY[name], _TORCHVISION_FOLDERS[name]
    files = ("data_batch_1..data_batch_5, test_batch, batches.meta" if name == "cifar10" else "train, test, meta")
    lines = [f"{pretty} was not found ({reason}).", "Looked in: " + ", ".join(str(d) for d in search) + ".",
             f"Put it in one of these folders, or set the environment variable {paths.DATA_ENV_VAR} to the "
             "folder that holds it, in either layout:"]
    for d in search:
        lines.append(f"  - torchvision's format: {d / tv}/ ({files}; the extracted python-version tarball)")
        lines.append(f"  - ImageFolder layout:   {d / name}/train/<class>/*.png|jpg and "
                     f"{d / name}/test/<class>/*.png|jpg")
    lines.append("Or let torchvision download it (network access, and MNV2_OFFLINE unset or "
                 "load_dataset(..., download=True)), or use dataset='synthetic' for an offline demo.")
    return "\n".join(lines)


def _find_cifar(name: str, search: list[Path]) -> tuple[str, Path] | None:
    """("torchvision" | "imagefolder", folder) of the first copy of ``name`` in ``search``."""
    for d in search:
        tv = d / _TORCHVISION_FOLDERS[name]
        marker = "test_batch" if name == "cifar10" else "test"
        if (tv / marker).is_file():
            return "torchvision", tv
        folder = d / name
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return "imagefolder", folder
    return None


def _download(name: str, target: Path, progress: bool) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    target.mkdir(parents=True, exist_ok=True)
    quiet = contextlib.nullcontext() if progress else _silenced()
    with quiet:
        cls(root=str(target), train=True, download=True)
        cls(root=str(target), train=False, download=True)


@contextlib.contextmanager
def _silenced():
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _synthetic(train_size, test_size, seed) -> Dataset:
    train_size = 5000 if train_size is None else train_size
    test_size = 1000 if test_size is None else test_size
    for field_name, value in (("train_size", train_size), ("test_size", test_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{field_name}: got {value!r}; allowed values are None or integers >= 1")
    train_x, train_y = make_synthetic(train_size, seed=2 * int(seed))
    test_x, test_y = make_synthetic(test_size, seed=2 * int(seed) + 1)
    mean, std = channel_stats(train_x)
    return Dataset("synthetic", "synthetic (procedural, not CIFAR)", SYNTHETIC_CLASSES, train_x, train_y,
                   test_x, test_y, mean, std, source=f"procedural (mnv2lib.engine.data.make_synthetic, seed {seed})",
                   train_indices=torch.arange(train_size), test_indices=torch.arange(test_size))


def _assemble(name, description, classes, splits: dict, train_size, test_size, seed, source,
              full_train_hist: torch.Tensor | None = None) -> Dataset:
    out = {}
    for split, size, offset in (("train", train_size, 0), ("test", test_size, 1)):
        images, labels = splits[split]
        order = balanced_order(labels, size, seed=2 * int(seed) + offset, field=f"{split}_size")
        out[split] = (images[order], labels[order], order)
    if train_size is None and full_train_hist is not None:
        mean, std = _stats_from_histograms(full_train_hist)
    else:
        mean, std = channel_stats(out["train"][0])
    return Dataset(name, description, tuple(classes), out["train"][0], out["train"][1], out["test"][0],
                   out["test"][1], mean, std, source=str(source), train_indices=out["train"][2],
                   test_indices=out["test"][2])


def _published_md5(name: str) -> dict[str, str]:
    """File name -> MD5 of the files of torchvision's CIFAR release (torchvision keeps the list)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    return {**dict(cls.train_list), **dict(cls.test_list), cls.meta["filename"]: cls.meta["md5"]}


_VERIFIED: set[tuple] = set()  # (path, size, mtime_ns) already checked in this process


def _verify_cifar_file(name: str, path: Path) -> None:
    """A DatasetIntegrityError unless ``path`` has the published MD5 (before anything unpickles it)."""
    from torchvision.datasets.utils import calculate_md5

    expected = _published_md5(name)[path.name]
    st = path.stat()
    stamp = (str(path), st.st_size, st.st_mtime_ns)
    if stamp in _VERIFIED:
        return
    actual = calculate_md5(str(path))
    if actual != expected:
        raise DatasetIntegrityError(
            f"dataset: {path} is not {_PRETTY[name]}'s published {path.name} (MD5 {actual}, expected {expected}); "
            "it was not loaded, because unpickling a file can run any code in it. Allowed: the original files of "
            f"the python-version tarball (delete {path.parent} and load_dataset({name!r}) downloads them), or "
            "an ImageFolder copy")
    _VERIFIED.add(stamp)


def _from_torchvision(name: str, folder: Path, train_size, test_size, seed) -> Dataset:
    def unpickle(file):
        _verify_cifar_file(name, folder / file)
        with open(folder / file, "rb") as f:
            return pickle.load(f, encoding="latin1")

    if name == "cifar10":
        batches = [unpickle(f"data_batch_{i}") for i in range(1, 6)]
        train = (np.concatenate([b["data"] for b in batches]), sum((list(b["labels"]) for b in batches), []))
        test_batch = unpickle("test_batch")
        test = (test_batch["data"], test_batch["labels"])
        classes = unpickle("batches.meta")["label_names"]
    else:
        tr, te = unpickle("train"), unpickle("test")
        train, test = (tr["data"], tr["fine_labels"]), (te["data"], te["fine_labels"])
        classes = unpickle("meta")["fine_label_names"]
    splits = {s: (torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8).reshape(-1, 3, 32, 32)),
                  torch.as_tensor(y, dtype=torch.int64)) for s, (x, y) in (("train", train), ("test", test))}
    return _assemble(name, _PRETTY[name], classes, splits, train_size, test_size, seed, folder)


def _from_imagefolder(folder: Path, name: str, train_size, test_size, seed, progress: bool,
                      image_size: int | None = None) -> Dataset:
    splits, hist, quality, sizes = {}, None, None, {}
    for split in ("train", "test"):
        record = _load_split_cached(folder / split, progress, image_size)
        splits[split] = (record["images"], record["labels"])
        # the sizes of the files (a split decoded for an image_size holds resized images; older caches lack it)
        sizes[split] = {tuple(s) for s in record.get("sizes") or [record["images"].shape[-2:]]}
        if split == "train":
            classes, hist, quality, kinds = record["classes"], record["hist"], record["jpeg_quality"], record["kinds"]
            if len(classes) < 2:  # one class trains to loss 0 and accuracy 1 and means nothing
                raise ValueError(f"dataset: {folder} has {len(classes)} class ({', '.join(classes)}); allowed: at "
                                 "least 2 classes (one folder per class under train/ and test/)")
        elif record["classes"] != classes:
            raise ValueError(f"dataset: {folder}: train/ and test/ have different classes "
                             f"({classes} vs {record['classes']})")
    shapes = {s: tuple(splits[s][0].shape[-2:]) for s in splits}
    if image_size is None and shapes["train"] != shapes["test"]:
        raise ValueError(f"dataset: {folder}: the train/ images are {_size_text(shapes['train'])} but the test/ images "
                         f"are {_size_text(shapes['test'])}; allowed: one size (or load_dataset(..., image_size=N) "
                         "to resize every image to N x N)")
    pretty = _PRETTY.get(name, name)
    if kinds == ["jpeg"]:
        description = f"{pretty} (JPEG q{quality} copy)" if quality else f"{pretty} (JPEG copy)"
    elif name in _PRETTY:
        description = f"{pretty} (ImageFolder copy)"
    else:
        description = f"{name} (ImageFolder)"
    return _to_size(_assemble(name, description, classes, splits, train_size, test_size, seed, folder, hist),
                    image_size, sizes["train"] | sizes["test"])


def _size_text(size) -> str:
    return f"{size[0]}x{size[1]}"


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> (N, C, size, size): torchvision's ``Resize(size)`` (shorter side to
    ``size``, antialiased bilinear) then ``CenterCrop(size)``; images already that size are returned as is."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    from torchvision.transforms.v2 import functional as TF

    out = []
    with torch_threads(1):  # many small images: threads only add barrier waits (see BatchLoader)
        for start in range(0, len(images), 4096):  # bounded temporaries
            chunk = TF.resize(images[start:start + 4096], [size], antialias=True)
            out.append(TF.center_crop(chunk, [size, size]))
    return torch.cat(out).contiguous() if out else images.new_empty((0, images.shape[1], size, size))


def _to_size(ds: Dataset, image_size: int | None, sizes: set | None = None) -> Dataset:
    """``ds`` with image_size x image_size images (None: ``ds``). ``sizes``: the (H, W) of the source
    files, which the name and description of a resized dataset state (so its runs get their own keys)."""
    final = None if image_size is None else (image_size, image_size)
    sizes = sizes or {tuple(ds.train_images.shape[-2:]), tuple(ds.test_images.shape[-2:])}
    if final is None or sizes == {final}:
        return ds
    train, test = resize_images(ds.train_images, image_size), resize_images(ds.test_images, image_size)
    source = _size_text(next(iter(sizes))) if len(sizes) == 1 else "mixed"
    what = f"{source} images" if len(sizes) == 1 else f"images of {len(sizes)} sizes"
    mean, std = channel_stats(train)
    return Dataset(f"{ds.name}-{source}-to-{_size_text(final)}",
                   f"{ds.description}, {what} resized to {_size_text(final)}", ds.classes, train, ds.train_labels,
                   test, ds.test_labels, mean, std, source=ds.source, train_indices=ds.train_indices,
                   test_indices=ds.test_indices)


def _unreadable(path, error: OSError) -> ValueError:
    """A file or folder of the tree that cannot be read (a symbolic link loop, a broken link, no permission)."""
    what = error.strerror or str(error)
    if error.errno == errno.ELOOP:
        what += ": a symbolic link loop"
    elif os.path.islink(path) and not os.path.exists(path):
        what += f": a broken symbolic link to {os.readlink(path)!r}"
    return ValueError(f"dataset: cannot read {path} ({what}); allowed: readable image files and class folders "
                      "(fix or delete this one)")


def _list_split(split_dir: Path) -> tuple[list[str], list[list[str]], list]:
    """Class names, file names per class (sorted) and a fingerprint of the listing."""
    def is_class(e) -> bool:
        try:
            return e.is_dir() and not e.name.startswith(".")
        except OSError as error:  # a looping link: DirEntry.is_dir raises instead of saying False
            raise _unreadable(e.path, error) from None

    classes = sorted(e.name for e in os.scandir(split_dir) if is_class(e))
    if not classes:
        raise DatasetNotFoundError(f"dataset: {split_dir} has no class folders (expected {split_dir}/<class>/*.jpg)")
    if set(classes) == set(CIFAR10_CLASSES):
        classes = list(CIFAR10_CLASSES)  # already alphabetical; kept explicit
    files, fingerprint = [], []
    for c in classes:
        try:
            entries = sorted((e for e in os.scandir(split_dir / c)
                              if e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".")),
                             key=lambda e: e.name)
        except OSError as error:
            raise _unreadable(split_dir / c, error) from None
        if not entries:
            message = (f"dataset: class folder {split_dir / c} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            if split_dir.name == "train":
                raise ValueError(f"{message}; allowed: at least one training image per class "
                                 "(remove the folder or add its images)")
            warnings.warn(f"{message}: that class is not tested", UserWarning, stacklevel=3)
        files.append([e.name for e in entries])
        # every file's size and mtime (one stat each, cheap next to decoding): a replaced image changes the key
        stats = []
        for e in entries:
            try:
                stats.append(e.stat())
            except OSError as error:  # a broken or looping symbolic link
                raise _unreadable(e.path, error) from None
        fingerprint.append([c, [(e.name, st.st_size, st.st_mtime_ns) for e, st in zip(entries, stats)]])
    return classes, files, fingerprint


def _cache_problem(record) -> str | None:
    """Why a loaded decode cache cannot be used (None: it can)."""
    if not isinstance(record, dict) or any(k not in record for k in _CACHE_FIELDS):
        return "not a decode cache of this version"
    images, labels = record["images"], record["labels"]
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
            and isinstance(labels, torch.Tensor) and len(labels) == len(images)):
        return "its images or labels have the wrong type or shape"
    return None


def _load_split_cached(split_dir: Path, progress: bool, image_size: int | None = None) -> dict:
    classes, files, fingerprint = _list_split(split_dir)
    key = hashlib.sha256(repr((CACHE_VERSION, str(split_dir.resolve()), fingerprint)).encode()).hexdigest()[:20]
    cache = paths.CACHE_DIR / "images" / f"{split_dir.parent.name}-{split_dir.name}-{key}.pt"
    # the images as the files hold them; or, decoded for an image_size they did not have, resized (a
    # folder of mixed sizes can only be cached so), per size
    resized = cache.with_name(f"{cache.stem}-{image_size}px.pt") if image_size else None
    for path in (cache, resized):
        if path is None or not path.exists():
            continue
        try:
            cached = torch.load(path, weights_only=True)
            problem = _cache_problem(cached)
        except Exception as error:  # truncated or from another torch: decode again
            problem = f"unreadable ({type(error).__name__}: {error})"
        if problem is None:
            return cached
        warnings.warn(f"image cache {path}: {problem}; decoding again")
    record = _decode_split(split_dir, classes, files, progress, image_size)
    record["hist"] = _histograms(record["images"])
    path = cache if record["resized_to"] is None else resized
    try:
        save_atomic(record, path)
    except (OSError, RuntimeError) as error:  # a read-only or full disk: the decoded images are still good
        warnings.warn(f"image cache: cannot write {path} ({type(error).__name__}: {error}); the images are "
                      "decoded again next time")
    return record


def _jpeg_size(data) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header (SOFn marker); None when there is none. PIL's
    ``Image.open`` reads the same header but costs as much as decoding a CIFAR-sized JPEG."""
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn: P, Y, X
            return (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
        else:
            i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_data_problem(data) -> str | None:
    """What is wrong with a PNG's pixel data against its header (None: nothing found). PIL fills
    the rows a short zlib stream lacks without a word; libpng refuses, but torchvision's binding of
    it then kills the process. So the stream is inflated here (bounded) and its length checked."""
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour, interlace = data[24], data[25], data[28]
    if colour not in _PNG_CHANNELS:
        return None  # PIL names the problem
    bits = _PNG_CHANNELS[colour] * depth

    def rows(w, h):  # bytes of h filtered rows of w pixels
        return h * (1 + (w * bits + 7) // 8) if w and h else 0

    def span(n, start, step):  # pixels of an Adam7 pass along a side of n
        return max(0, -(-(n - start) // step))

    if interlace:
        expected = sum(rows(span(width, x, dx), span(height, y, dy)) for x, y, dx, dy in _ADAM7)
    else:
        expected = rows(width, height)
    inflate, got, i = zlib.decompressobj(), 0, 8
    try:
        while i + 8 <= len(data) and got < expected:
            length, kind = int.from_bytes(data[i:i + 4], "big"), bytes(data[i + 4:i + 8])
            if kind == b"IDAT":
                pending = data[i + 8:i + 8 + length]
                while pending and got < expected:  # at most 16 MiB inflated at a time, none of it kept
                    out = inflate.decompress(pending, min(expected - got, 1 << 24))
                    got, pending = got + len(out), inflate.unconsumed_tail
                    if not out:
                        break
            elif kind == b"IEND":
                break
            i += 12 + length
    except zlib.error as error:
        return f"its pixel data is damaged (zlib: {error})"
    if got < expected:
        return (f"its pixel data ends early: {got:,} of the {expected:,} bytes its {width}x{height} header "
                "says (a truncated or altered file)")
    return None


def _pil_rgb(im) -> np.ndarray:
    """A PIL image as 8-bit RGB (H, W, 3): 16-bit samples keep their high byte (PIL does that itself
    for 16-bit RGB, but saturates 16-bit grey at 255), alpha is dropped."""
    if im.mode.startswith("I;16") or im.mode == "I":
        grey = np.asarray(im)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise ValueError(f"{im.mode} pixels outside 0..65535")
        return np.repeat((grey.astype(np.int64) >> 8).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode == "F":
        raise ValueError("32-bit floating-point pixels")
    return np.asarray(im.convert("RGB"))


def _decoder():
    """A function path -> uint8 (3, H, W). JPEGs: torchvision's libjpeg-turbo decoder (about 3x faster
    than PIL on CIFAR-sized JPEGs, same pixels) once the size in the header is within bounds. Every
    other format: PIL, whose decoders raise on damaged data (torchvision's PNG decoder kills the
    process on a PNG with less data than its header says), after the PNG check above."""
    from PIL import Image

    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        decode_jpeg = None

    def refuse(path: str, problem: str) -> ValueError:
        return ValueError(f"dataset: cannot decode {path} ({problem}); allowed: complete 8- or 16-bit image "
                          f"files of at most {Image.MAX_IMAGE_PIXELS:,} pixels (replace or delete this one)")

    def too_large(width: int, height: int) -> str | None:
        limit = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb bound (it only warns up to twice that)
        if limit and width * height > limit:
            return (f"its header claims {width}x{height} = {width * height:,} pixels, more than "
                    f"PIL.Image.MAX_IMAGE_PIXELS = {limit:,}")
        return None

    def with_pil(path: str, data: bytes) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(data)) as im:
                problem = too_large(*im.size) or (_png_data_problem(data) if im.format == "PNG" else None)
                if problem is None:
                    return torch.from_numpy(_pil_rgb(im).copy()).permute(2, 0, 1)
        except Exception as error:  # truncated, not an image, a bomb: PIL's message names no file
            problem = f"{type(error).__name__}: {error}"
        raise refuse(path, problem)

    def decode(path: str) -> torch.Tensor:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as error:
            raise _unreadable(path, error) from None
        if decode_jpeg is not None and data[:3] == b"\xff\xd8\xff":
            size = _jpeg_size(data)
            if size is not None and all(size) and too_large(*size) is None:
                try:
                    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
                except Exception:  # PIL below decodes it or names the problem
                    pass
        return with_pil(path, data)

    return decode


def _decode_split(split_dir: Path, classes: list[str], files: list[list[str]], progress: bool,
                  image_size: int | None = None) -> dict:
    paths_ = [str(split_dir / c / f) for c, names in zip(classes, files) for f in names]
    labels = torch.tensor([i for i, names in enumerate(files) for _ in names], dtype=torch.int64)
    if not paths_:
        raise DatasetNotFoundError(f"dataset: {split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    from PIL import Image

    decode = _decoder()

    def decode_chunk(chunk: range) -> list[tuple[tuple[int, int], torch.Tensor]]:
        out = []
        for i in chunk:
            im = decode(paths_[i])
            # resized at once: a folder of photos is never held in memory at full size
            out.append((tuple(im.shape[-2:]), im if image_size is None else resize_images(im[None], image_size)[0]))
        return out

    t0 = time.perf_counter()
    if progress:
        print(f"Decoding {len(paths_):,} images of {split_dir} once (cached in {paths.CACHE_DIR / 'images'})...")
    chunk_size = 1000
    chunks = [range(i, min(i + chunk_size, len(paths_))) for i in range(0, len(paths_), chunk_size)]
    workers = max(1, min(4, os.cpu_count() or 1))
    # torchvision >= 0.29 flags its decoders as deprecated (for TorchCodec); they still work, and
    # the filter is set here, once, in the calling thread (warning filters are process-wide)
    with torch_threads(1), warnings.catch_warnings(), ThreadPoolExecutor(workers) as pool:
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the decoder refuses those itself
        results = list(_progress(pool.map(decode_chunk, chunks), enabled=progress, total=len(chunks),
                                 desc=f"decoding {split_dir.name}", unit="chunk", leave=False))
    first = {}  # (H, W) of the files -> the first file of that size
    for path, (size, _) in zip(paths_, (item for chunk in results for item in chunk)):
        first.setdefault(size, path)
    if len(first) != 1 and image_size is None:
        found = ", ".join(f"{_size_text(s)} ({p})" for s, p in sorted(first.items())[:5])
        raise ValueError(f"dataset: the images of {split_dir} have {len(first)} different sizes, e.g. {found}; "
                         "allowed: one size, or load_dataset(..., image_size=N) to resize every image to N x N")
    stacked = torch.stack([im for chunk in results for _, im in chunk])
    resized_to = None if image_size is None or set(first) == {(image_size, image_size)} else image_size
    is_jpeg = [p.lower().endswith((".jpg", ".jpeg")) for p in paths_]
    kinds = sorted({"jpeg" if j else "other" for j in is_jpeg})
    quality = _jpeg_quality(paths_[is_jpeg.index(True)]) if "jpeg" in kinds else None
    if progress:
        print(f"  decoded {len(paths_):,} images in {time.perf_counter() - t0:.1f} s")
    return {"images": stacked, "labels": labels, "classes": list(classes), "jpeg_quality": quality,
            "kinds": kinds, "source": str(split_dir), "sizes": sorted(first), "resized_to": resized_to}


def _jpeg_quality(path: str) -> int | None:
    """IJG quality estimated from the luminance quantization table (None if not an IJG table)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            table = np.array(im.quantization[0], dtype=np.float64)
    except Exception:
        return None
    scale = 100.0 * table.sum() / _IJG_LUMINANCE.sum()
    quality = (200.0 - scale) / 2.0 if scale <= 100 else 5000.0 / scale
    quality = int(round(quality))
    expected_scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    expected = np.clip(np.floor((_IJG_LUMINANCE * expected_scale + 50) / 100), 1, 255)
    return quality if np.abs(expected - table).max() <= 1 else None


# ---------------------------------------------------------------------------------------------
# augmentation and batching


def crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
              padding: int = 4) -> torch.Tensor:
    """Crop each image of ``images`` (N, C, H, W) to (H, W) from the zero-padded image at offset
    (``top[i]``, ``left[i]``) in 0..2*padding, then mirror it left-right where ``flip[i]``;
    vectorized, on the images' device. Returns a channels-last strided (N, C, H, W) tensor."""
    n, _, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    rows = top.to(dev).view(n, 1) + torch.arange(h, device=dev).view(1, h)
    cols = left.to(dev).view(n, 1) + torch.arange(w, device=dev).view(1, w)
    cols = torch.where(flip.to(dev).view(n, 1), cols.flip(1), cols)
    nhwc = padded.permute(0, 2, 3, 1)
    out = nhwc[torch.arange(n, device=dev).view(n, 1, 1), rows.view(n, h, 1), cols.view(n, 1, w)]
    return out.permute(0, 3, 1, 2)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4,
                     flip: bool = True) -> torch.Tensor:
    """Random crop with ``padding`` zero pixels on each side, and a random horizontal flip (p=0.5),
    as torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip, for a whole batch. The random
    draws come from ``generator`` (CPU), so results do not depend on the device."""
    n = images.shape[0]
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return crop_flip(images, top, left, flips, padding)


class BatchLoader:
    """Batches ``(normalized float32 images, int64 labels)`` from uint8 images (N, C, H, W).

    train=True: a seeded shuffle and augmentation (random crop with ``padding`` zero pixels, and
    horizontal flip); train=False: data order, no augmentation (``shuffle`` / ``augment`` override).
    ``shard=(rank, world_size)`` (distributed data parallel): every rank draws the same global
    batches and keeps its contiguous ``batch_size / world_size`` share of each.
    Each batch is gathered on the images' device, moved to ``device``, augmented and normalized
    there. The random draws come from a CPU ``torch.Generator`` seeded with ``seed`` at the start of
    every iteration, so iterating twice gives the same batches on any device.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128, *, train: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, seed: int = 0,
                 device: str | torch.device | None = None, channels_last: bool = False, drop_last: bool = False,
                 shuffle: bool | None = None, augment: bool | None = None, padding: int = 4,
                 shard: tuple[int, int] = (0, 1)) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images: got {images.dtype} {tuple(images.shape)}; allowed: uint8 (N, C, H, W)")
        if len(labels) != len(images):
            raise ValueError(f"labels: got {len(labels)} labels for {len(images)} images; allowed: one per image")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size!r}; allowed values are integers >= 1")
        if mean is None or std is None:
            mean, std = channel_stats(images)
        rank, world = shard
        if isinstance(world, bool) or not isinstance(world, int) or world < 1 or not 0 <= rank < world:
            raise ValueError(f"shard: got {shard!r}; allowed: (rank, world_size) with 0 <= rank < world_size")
        if world > 1 and (batch_size % world or not drop_last):
            raise ValueError(f"batch_size: got {batch_size} for {world} ranks; allowed: a multiple of the world size "
                             "(with drop_last=True), so that every rank gets an equal share of each batch")
        self.shard = (rank, world)
        self.images, self.labels = images, torch.as_tensor(labels).to(torch.int64)
        self.batch_size, self.seed = batch_size, int(seed)
        self.shuffle = train if shuffle is None else shuffle
        self.augment = train if augment is None else augment
        self.padding, self.drop_last, self.channels_last = int(padding), drop_last, channels_last
        self.device = torch.device(device) if device is not None else images.device
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._scale, self._shift = _affine(self.mean, self.std, self.device)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Every random draw of the pass (order, crop offsets, flips) is made up front on the CPU
        # generator and moved to the images' device once: no per-batch host-to-device copies or
        # syncs when the images live on a GPU, and the same batches on every device.
        g = torch.Generator().manual_seed(self.seed)
        n, dev = len(self.labels), self.images.device
        order = torch.randperm(n, generator=g).to(dev) if self.shuffle else None
        crops = None
        if self.augment:
            span = 2 * self.padding + 1
            crops = (torch.randint(0, span, (n,), generator=g).to(dev), torch.randint(0, span, (n,), generator=g).to(dev),
                     (torch.rand(n, generator=g) < 0.5).to(dev))
        labels = self.labels.to(dev)
        for b in range(len(self)):
            # one intra-op thread while building the batch (the caller's setting is back for the
            # model step): these small ops gain nothing from threads and, on a CPU shared with other
            # jobs, OpenMP barrier waits made a batch ~30x slower (110 ms instead of 4 ms)
            with torch_threads(1):
                batch = self._batch(b, order, crops, labels)
            yield batch

    def _batch(self, b: int, order: torch.Tensor | None, crops, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = b * self.batch_size, min(len(self.labels), (b + 1) * self.batch_size)
        rank, world = self.shard
        if world > 1:  # this rank's contiguous share of the global batch (every rank draws the same order)
            share = (hi - lo) // world
            lo, hi = lo + rank * share, lo + (rank + 1) * share
        idx = order[lo:hi] if order is not None else slice(lo, hi)
        x, y = self.images[idx], labels[idx]
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if crops is not None:
            top, left, flip = (c[lo:hi] for c in crops)
            x = crop_flip(x, top, left, flip, self.padding)
        shape = (1, -1, 1, 1)
        x = x.to(torch.float32).mul_(self._scale.view(shape)).add_(self._shift.view(shape))
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt), y
