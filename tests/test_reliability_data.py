"""Issue 31, data and training inputs: damaged images, your own image sizes and bit depths, symbolic
links, offline loading, and datasets or evaluation sets that cannot give a meaningful number.

``ERRORS``: each case must raise the given error type with a message naming the field or the file.
``RESULTS``: each case must load, with the result its check asserts. ``CRASHES``: images that killed the
process inside torchvision's decoder; each is decoded in a subprocess, so a regression fails one test
instead of taking the suite down. Everything uses tiny images written here.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnv2lib import build_model
from mnv2lib.engine import data as D
from mnv2lib.engine.corruptions import check_dataset_images, evaluate_corruptions
from mnv2lib.engine.train import TrainConfig, evaluate, train_model
from mnv2lib.models.pretrained import OFFLINE_ENV_VAR
from mnv2lib.runs import profiles, spec
from mnv2lib.utils import paths

TINY = dict(num_classes=10, width_mult=0.25, stem="cifar_lite")
CONFIG = TrainConfig(epochs=1, batch_size=4, lr=0.05, eval_batch_size=4, device="cpu")


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    """A temporary folder, with the decode cache and the data folders in it (nothing found, nothing kept)."""
    monkeypatch.setenv(paths.DATA_ENV_VAR, str(tmp_path / "ext"))
    monkeypatch.delenv(OFFLINE_ENV_VAR, raising=False)
    monkeypatch.setattr(paths, "DATA_DIR", tmp_path / "data")
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path / "cache")
    for d in ("ext", "data"):
        (tmp_path / d).mkdir()
    return tmp_path


# ---------------------------------------------------------------------------------------------
# writing test images


def _folder(root: Path, size=(8, 8), classes=("a", "b"), per_class: int = 2) -> Path:
    """An ImageFolder tree of random 8-bit RGB PNGs of ``size`` (H, W)."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png16(path: Path, array) -> None:
    """A 16-bit PNG (grey for (H, W), RGB for (H, W, 3)); PIL writes no 16-bit RGB."""
    array = np.asarray(array, dtype=">u2")
    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + array[r].tobytes() for r in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2 if array.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw))
                     + _chunk(b"IEND", b""))


def _png_bytes(size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """An 8x8 PNG whose header (CRC fixed) claims ``width`` x ``height``."""
    data = bytearray(_png_bytes())
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _png_damaged_idat() -> bytes:
    data = bytearray(_png_bytes((32, 32)))
    data[100] ^= 0xFF  # inside the zlib stream: its check fails
    return bytes(data)


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A 32x32 JPEG whose frame header claims ``width`` x ``height``."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    struct.pack_into(">HH", data, i + 5, height, width)
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# the cases


def _with_file(root: Path, name: str, content: bytes) -> Path:
    (root / "train" / "a" / name).write_bytes(content)
    return root


def _symlink(ctx: Path, *links: tuple[str, str]) -> Path:
    root = _folder(ctx / "links")
    for name, target in links:
        os.symlink(target, root / "train" / "a" / name)
    return root


def _offline(ctx: Path, monkeypatch, **kwargs):
    monkeypatch.setenv(OFFLINE_ENV_VAR, "1")
    monkeypatch.setattr(D, "_download", lambda *a, **k: pytest.fail("a download was attempted offline"))
    return D.load_dataset("cifar10", progress=False, **kwargs)


def _one_class_dataset() -> D.Dataset:
    ds = D.load_dataset("synthetic", train_size=8, test_size=4, progress=False)
    return dataclasses.replace(ds, classes=ds.classes[:1], train_labels=torch.zeros_like(ds.train_labels),
                               test_labels=torch.zeros_like(ds.test_labels))


def _train(dataset):
    torch.manual_seed(0)
    return train_model(build_model(**TINY), dataset, CONFIG, show_progress=False)


def _no_test_images() -> D.Dataset:
    ds = D.load_dataset("synthetic", train_size=8, test_size=4, progress=False)
    return dataclasses.replace(ds, test_images=ds.test_images[:0], test_labels=ds.test_labels[:0])


def _evaluate_nothing():
    return evaluate(build_model(**TINY), torch.zeros(0, 3, 32, 32, dtype=torch.uint8),
                    torch.zeros(0, dtype=torch.int64), (0.5,) * 3, (0.25,) * 3, device="cpu")


def _two_sizes(ctx: Path) -> Path:
    root = _folder(ctx / "splits", size=(40, 40))
    for c in ("a", "b"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "test" / c / "0.png")
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "test" / c / "1.png")
    return root


def _mixed(ctx: Path) -> Path:
    root = _folder(ctx / "mixed", size=(40, 40))
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(root / "train" / "a" / "wide.png")
    return root


# (id, case(ctx, monkeypatch), error type, what the message must name)
ERRORS = [
    # damaged images that decode in-process without risk (the crashing ones are CRASHES below)
    ("truncated PNG", lambda c, m: D.load_dataset(_with_file(_folder(c / "t"), "cut.png", _png_bytes((32, 32))[:300]),
                                                  progress=False), ValueError, ["cut.png"]),
    ("not an image", lambda c, m: D.load_dataset(_with_file(_folder(c / "n"), "text.png", b"hello"),
                                                 progress=False), ValueError, ["text.png"]),
    # your own images
    ("mixed sizes, no image_size", lambda c, m: D.load_dataset(_mixed(c), progress=False), ValueError,
     ["mixed/train", "30x50", "40x40", "image_size"]),
    ("train 40x40, test 32x32", lambda c, m: D.load_dataset(_two_sizes(c), progress=False), ValueError,
     ["splits", "40x40", "32x32", "image_size"]),
    ("corruptions of 40x40 images", lambda c, m: check_dataset_images(D.load_dataset(_folder(c / "big", (40, 40)),
                                                                                     progress=False)),
     ValueError, ["'big'", "40x40", "allowed: 32x32", "image_size=32"]),
    ("evaluate_corruptions on 40x40 images", lambda c, m: evaluate_corruptions(
        build_model(**TINY), D.load_dataset(_folder(c / "big", (40, 40)), progress=False), ("contrast",), (1,), 4),
     ValueError, ["'big'", "40x40", "32x32"]),
    ("image_size=0", lambda c, m: D.load_dataset("synthetic", image_size=0), ValueError, ["image_size"]),
    ("image_size=True", lambda c, m: D.load_dataset("synthetic", image_size=True), ValueError, ["image_size"]),
    ("image_size='32'", lambda c, m: D.load_dataset("synthetic", image_size="32"), ValueError, ["image_size"]),
    # symbolic links
    ("a file linking to itself", lambda c, m: D.load_dataset(_symlink(c, ("x.png", "x.png")), progress=False),
     ValueError, ["train/a/x.png", "loop"]),
    ("two files linking to each other", lambda c, m: D.load_dataset(
        _symlink(c, ("x.png", "y.png"), ("y.png", "x.png")), progress=False), ValueError, ["train/a/x.png", "loop"]),
    ("a broken link", lambda c, m: D.load_dataset(_symlink(c, ("x.png", "gone.png")), progress=False), ValueError,
     ["train/a/x.png", "broken", "gone.png"]),
    ("a class folder linking to itself", lambda c, m: os.symlink("c", _folder(c / "dirs") / "train" / "c")
     or D.load_dataset(c / "dirs", progress=False), ValueError, ["dirs/train/c", "loop"]),
    # offline
    ("MNV2_OFFLINE=1, CIFAR-10 missing", lambda c, m: _offline(c, m), D.DatasetNotFoundError,
     ["CIFAR-10", "MNV2_OFFLINE=1"]),
    ("download='yes'", lambda c, m: D.load_dataset("cifar10", download="yes"), ValueError, ["download"]),
    # nothing to learn or to measure
    ("one-class ImageFolder", lambda c, m: D.load_dataset(_folder(c / "solo", classes=("only",)), progress=False),
     ValueError, ["solo", "1 class", "only", "at least 2"]),
    ("one-class Dataset into train_model", lambda c, m: _train(_one_class_dataset()), ValueError,
     ["'synthetic'", "1 class", "at least 2"]),
    ("Dataset without test images into train_model", lambda c, m: _train(_no_test_images()), ValueError,
     ["test_images", "'synthetic'"]),
    ("evaluate on no images", lambda c, m: _evaluate_nothing(), ValueError, ["images", "no images"]),
]


@pytest.mark.parametrize("case, error, names", [pytest.param(f, e, n, id=i) for i, f, e, n in ERRORS])
def test_bad_data_gives_a_clear_error(case, error, names, ctx, monkeypatch):
    with pytest.raises(error) as caught:
        case(ctx, monkeypatch)
    message = str(caught.value)
    for name in names:
        assert name in message, f"{name!r} not in: {message}"


def _is(ok: bool, what) -> None:
    assert ok, what


def _pixels(ds: D.Dataset) -> set[int]:
    return set(torch.cat([ds.train_images.flatten(), ds.test_images.flatten()]).unique().tolist())


def _sixteen_bit(ctx: Path, grey: bool, every: bool) -> Path:
    root = _folder(ctx / "deep")
    for split in ("train", "test"):
        for c in ("a", "b"):
            for i in range(2 if every else 1 if (split, c) == ("train", "a") else 0):
                _png16(root / split / c / f"{i}.png", np.full((8, 8) if grey else (8, 8, 3), 40000))
    return root


def _run_key(ds: D.Dataset) -> str:
    from mnv2lib.models import ModelConfig

    return spec.run_key(ModelConfig(**TINY), profiles.PROFILES["smoke"], spec.dataset_identity(ds), 0)


def _check_resized(ds: D.Dataset, ctx: Path) -> None:
    assert ds.image_shape == (3, 32, 32)
    assert ds.name == "big-40x40-to-32x32" and ds.description == "big (ImageFolder), 40x40 images resized to 32x32"
    check_dataset_images(ds)  # ready for the corruptions
    native = D.load_dataset(_folder(ctx / "native" / "big", (32, 32)), progress=False)
    assert native.name == "big"  # a 32x32 folder keeps its name, so its run keys
    assert _run_key(ds) != _run_key(native)
    # Resize(32) + CenterCrop(32), antialiased, as torchvision computes it
    from torchvision.transforms.v2 import functional as TF

    raw = D.load_dataset(ctx / "big", progress=False)
    assert torch.equal(ds.train_images, TF.resize(raw.train_images, [32], antialias=True))
    # train on it: the whole point
    train_model(build_model(**TINY), ds, CONFIG, show_progress=False)


def _check_unchanged(ds: D.Dataset, ctx: Path) -> None:
    plain = D.load_dataset(ctx / "same", progress=False)
    assert (ds.name, ds.description) == (plain.name, plain.description) == ("same", "same (ImageFolder)")
    assert torch.equal(ds.train_images, plain.train_images) and _run_key(ds) == _run_key(plain)
    assert not list((ctx / "cache" / "images").glob("*px.pt"))  # one decode cache, the one image_size=None reads


def _check_mixed(ds: D.Dataset, ctx: Path) -> None:
    assert ds.image_shape == (3, 32, 32) and len(ds.train_labels) == 5
    assert ds.name == "mixed-mixed-to-32x32" and "images of 2 sizes resized to 32x32" in ds.description
    again = D.load_dataset(ctx / "mixed", image_size=32, progress=False)  # from the cache of the resized split
    assert torch.equal(again.train_images, ds.train_images)


# (id, case(ctx, monkeypatch) -> result, check(result, ctx))
RESULTS = [
    ("40x40 folder, image_size=32: resized, named", lambda c, m: D.load_dataset(
        _folder(c / "big", (40, 40)), image_size=32, progress=False), _check_resized),
    ("40x40 folder as it is (image_size=None)", lambda c, m: D.load_dataset(_folder(c / "big", (40, 40)),
                                                                           progress=False),
     lambda ds, c: _is(ds.image_shape == (3, 40, 40) and ds.name == "big", ds)),
    ("32x32 folder, image_size=32: unchanged", lambda c, m: D.load_dataset(
        _folder(c / "same", (32, 32)), image_size=32, progress=False), _check_unchanged),
    ("mixed sizes, image_size=32", lambda c, m: D.load_dataset(_mixed(c), image_size=32, progress=False), _check_mixed),
    ("train 40x40 / test 32x32, image_size=32", lambda c, m: D.load_dataset(_two_sizes(c), image_size=32,
                                                                           progress=False),
     lambda ds, c: _is(ds.image_shape == (3, 32, 32) and ds.name == "splits-mixed-to-32x32", ds)),
    ("synthetic, image_size=32: unchanged", lambda c, m: D.load_dataset("synthetic", train_size=20, test_size=10,
                                                                        image_size=32),
     lambda ds, c: _is((ds.name, ds.image_shape) == ("synthetic", (3, 32, 32)), ds)),
    ("16-bit grey PNGs: high byte, 8 bits", lambda c, m: D.load_dataset(_sixteen_bit(c, True, True), progress=False),
     lambda ds, c: _is(_pixels(ds) == {40000 >> 8}, _pixels(ds))),
    ("16-bit RGB PNGs: high byte, 8 bits", lambda c, m: D.load_dataset(_sixteen_bit(c, False, True), progress=False),
     lambda ds, c: _is(_pixels(ds) == {40000 >> 8}, _pixels(ds))),
    ("8- and 16-bit PNGs mixed", lambda c, m: D.load_dataset(_sixteen_bit(c, True, False), progress=False),
     lambda ds, c: _is(ds.train_images.dtype == torch.uint8 and 40000 >> 8 in _pixels(ds), ds)),
]


@pytest.mark.parametrize("case, check", [pytest.param(f, k, id=i) for i, f, k in RESULTS])
def test_data_that_loads_gives_the_right_result(case, check, ctx, monkeypatch):
    check(case(ctx, monkeypatch), ctx)


def test_offline_with_an_explicit_download_still_downloads(ctx, monkeypatch):
    """As for pretrained weights: MNV2_OFFLINE decides only when the caller does not."""
    called = []
    monkeypatch.setenv(OFFLINE_ENV_VAR, "1")
    monkeypatch.setattr(D, "_download", lambda *a, **k: called.append(a) or (_ for _ in ()).throw(OSError("no net")))
    with pytest.raises(D.DatasetNotFoundError, match="download failed: OSError: no net"):
        D.load_dataset("cifar10", download=True, progress=False)
    assert called


# ---------------------------------------------------------------------------------------------
# images that killed the process in torchvision's decoder: decoded in a subprocess, each in a child
# forked from it after the imports (one import of torch, and a crash takes only its own case down)

_DECODE = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from mnv2lib.utils import paths
    from mnv2lib.engine.data import load_dataset

    results = {}
    for root in sys.argv[2:]:
        paths.CACHE_DIR = Path(sys.argv[1]) / Path(root).name
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                load_dataset(root, progress=False)
                message = "loaded"
            except Exception as error:
                message = f"{type(error).__name__}: {error}"
            os.write(write, message.encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            message = pipe.read().decode()
        status = os.waitpid(pid, 0)[1]
        results[root] = {"status": status, "message": message}
    print(json.dumps(results))
""")

# (id, file name, its bytes, what the message must name besides the file)
CRASHES = [
    ("8x8 PNG whose header says 8x9", "short.png", lambda: _png_claiming(8, 9), "ends early"),
    ("PNG whose header says 20000x20000", "huge.png", lambda: _png_claiming(20000, 20000), "pixels"),
    ("PNG with a damaged zlib stream", "damaged.png", _png_damaged_idat, "damaged"),
    ("JPEG whose header says 60000x60000", "huge.jpg", lambda: _jpeg_claiming(60000, 60000), "pixels"),
]


@pytest.fixture(scope="module")
def decoded_in_children(tmp_path_factory) -> dict:
    """{file name: {"status": wait status, "message": the error}} for every case of CRASHES."""
    tmp = tmp_path_factory.mktemp("crashes")
    roots = {name: _with_file(_folder(tmp / name.replace(".", "_") / "tree"), name, content())
             for _, name, content, _ in CRASHES}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _DECODE, str(tmp / "cache"), *map(str, roots.values())],
                          capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, f"the decoding process died ({done.returncode}): {done.stderr[-2000:]}"
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: results[str(root)] for name, root in roots.items()}


@pytest.mark.parametrize("name, names", [pytest.param(f, n, id=i) for i, f, _, n in CRASHES])
def test_a_damaged_image_is_an_error_naming_it_not_a_crash(name, names, decoded_in_children):
    result = decoded_in_children[name]
    assert result["status"] == 0, f"decoding {name} killed the process (wait status {result['status']})"
    message = result["message"]
    assert message.startswith("ValueError: ") and f"train/a/{name}" in message and names in message, message
