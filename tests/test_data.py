"""mnv2lib.data: dataset loading (synthetic, ImageFolder, torchvision format, the real CIFAR-10 copy),
the decode cache, error messages, and tensor batching with augmentation."""
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mnv2lib.engine import data as D
from mnv2lib.utils import paths

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No data anywhere: MNV2_DATA_DIR and data/ point at empty folders; caches go to tmp."""
    monkeypatch.setenv(paths.DATA_ENV_VAR, str(tmp_path / "ext"))
    monkeypatch.setattr(paths, "DATA_DIR", tmp_path / "data")
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path / "cache")
    (tmp_path / "ext").mkdir()
    (tmp_path / "data").mkdir()
    return tmp_path


def _write_imagefolder(root: Path, classes=("b_cls", "a_cls", "c_cls"), per_class=(4, 2), fmt="png") -> dict:
    """A tiny ImageFolder tree; pixel values encode (split, class, index) so order can be checked."""
    from PIL import Image

    expected = {}
    for split, n in zip(("train", "test"), per_class):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                value = (sorted(classes).index(c) * 40 + i * 7 + (0 if split == "train" else 100)) % 256
                array = np.full((8, 8, 3), value, dtype=np.uint8)
                array[0, 0] = (value + 1) % 256
                Image.fromarray(array).save(root / split / c / f"{i:04d}.{fmt}", quality=95)
                expected[(split, c, i)] = value
    return expected


# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_is_deterministic_balanced_and_prefix_stable():
    a_x, a_y = D.make_synthetic(300, seed=3)
    b_x, b_y = D.make_synthetic(300, seed=3)
    c_x, _ = D.make_synthetic(300, seed=4)
    assert a_x.dtype == torch.uint8 and a_x.shape == (300, 3, 32, 32) and a_y.dtype == torch.int64
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    assert not torch.equal(a_x, c_x)
    assert torch.bincount(a_y).tolist() == [30] * 10
    assert torch.equal(D.make_synthetic(120, seed=3)[0], a_x[:120])  # a prefix of a larger set
    assert a_x.float().std() > 40  # not blank: colourful images with noise


def test_synthetic_default_dataset_is_fast_and_described():
    t0 = time.perf_counter()
    ds = D.load_dataset("synthetic")
    seconds = time.perf_counter() - t0
    assert seconds < 3.0, f"generating the default synthetic dataset took {seconds:.1f} s"
    assert (len(ds.train_labels), len(ds.test_labels)) == (5000, 1000)
    assert ds.name == "synthetic" and ds.description == "synthetic (procedural, not CIFAR)"
    assert ds.classes == D.SYNTHETIC_CLASSES and ds.num_classes == 10
    assert not torch.equal(ds.train_images[:100], ds.test_images[:100])  # train and test differ
    mean, std = D.channel_stats(ds.train_images)
    assert ds.mean == pytest.approx(mean) and ds.std == pytest.approx(std)
    assert all(0.3 < m < 0.7 for m in ds.mean) and all(0.15 < s < 0.35 for s in ds.std)
    assert "5000 train" in repr(ds)


def test_synthetic_is_learnable_but_not_from_raw_pixels():
    """Nearest-centroid on raw pixels is near chance, while a translation-invariant feature
    (random conv filters on the luminance, rectified, globally pooled) + ridge regression is far
    better: the class is in the shape, not in colour or position."""
    ds = D.load_dataset("synthetic", train_size=2000, test_size=500, seed=1)
    x = ds.train_images.float().flatten(1) / 255
    xt = ds.test_images.float().flatten(1) / 255
    centroids = torch.stack([x[ds.train_labels == k].mean(0) for k in range(10)])
    # class means differ (more than the noise of a 200-image mean) ...
    spread = torch.cdist(centroids, centroids)[~torch.eye(10, dtype=torch.bool)]
    assert spread.min() > 0.5
    # ... but classify poorly
    nearest_centroid = (torch.cdist(xt, centroids).argmin(1) == ds.test_labels).float().mean().item()
    assert nearest_centroid < 0.3

    g = torch.Generator().manual_seed(0)
    filters = torch.randn(48, 1, 5, 5, generator=g)
    filters -= filters.mean(dim=(2, 3), keepdim=True)

    def features(images):
        lum = images.float().mean(1, keepdim=True) / 255
        lum = (lum - lum.mean(dim=(2, 3), keepdim=True)) / (lum.std(dim=(2, 3), keepdim=True) + 1e-3)
        r = torch.nn.functional.conv2d(lum, filters).abs()
        pooled = torch.cat([r.mean(dim=(2, 3)), r.amax(dim=(2, 3)), (r > 1).float().mean(dim=(2, 3))], 1)
        return torch.cat([pooled, torch.ones(len(images), 1)], 1)

    f, ft = features(ds.train_images), features(ds.test_images)
    mu, sd = f.mean(0), f.std(0) + 1e-6
    f, ft = (f - mu) / sd, (ft - mu) / sd
    targets = torch.nn.functional.one_hot(ds.train_labels, 10).float()
    w = torch.linalg.solve(f.T @ f + 1.0 * torch.eye(f.shape[1]), f.T @ targets)
    learned = ((ft @ w).argmax(1) == ds.test_labels).float().mean().item()
    assert learned > nearest_centroid + 0.15, (learned, nearest_centroid)
    assert learned < 0.98  # not trivial either


# ---------------------------------------------------------------------------------------------
# names, errors, "auto"


def test_unknown_dataset_name_is_a_value_error_naming_field_value_and_allowed():
    with pytest.raises(ValueError) as info:
        D.load_dataset("imagenet")
    message = str(info.value)
    assert message.startswith("dataset:") and "'imagenet'" in message
    for allowed in D.DATASETS:
        assert repr(allowed) in message


def test_path_without_train_and_test_is_explained(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(D.DatasetNotFoundError, match=r"no test/ folder"):
        D.load_dataset(tmp_path)


def test_missing_cifar_without_download_says_where_to_put_it(isolated):
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_dataset("cifar10", download=False)
    message = str(info.value)
    assert "download=False" in message and paths.DATA_ENV_VAR in message
    for folder in (isolated / "ext", isolated / "data"):
        assert str(folder / "cifar-10-batches-py") in message  # torchvision's layout
        assert str(folder / "cifar10") + "/train/<class>/" in message  # ImageFolder layout
    assert "data_batch_1" in message and "test_batch" in message


def test_missing_cifar_when_the_download_fails(isolated, monkeypatch):
    calls = []

    def no_network(name, target, progress):
        calls.append((name, target))
        raise OSError("network is unreachable")

    monkeypatch.setattr(D, "_download", no_network)
    with pytest.raises(D.DatasetNotFoundError, match="download failed: OSError: network is unreachable"):
        D.load_dataset("cifar100")
    assert calls == [("cifar100", isolated / "data")]  # downloads go to data/


def test_auto_without_cifar_falls_back_to_synthetic_loudly(isolated, monkeypatch, capsys):
    monkeypatch.setattr(D, "_download", lambda *a: pytest.fail("'auto' must never download"))
    with pytest.warns(UserWarning, match="NOT CIFAR-10"):
        ds = D.load_dataset("auto", train_size=100, test_size=50)
    assert ds.name == "synthetic" and "not CIFAR" in ds.description
    assert "NOT CIFAR-10" in capsys.readouterr().out
    assert (len(ds.train_labels), len(ds.test_labels)) == (100, 50)


# ---------------------------------------------------------------------------------------------
# ImageFolder, cache, torchvision format


def test_imagefolder_cache_round_trip(isolated, monkeypatch):
    root = isolated / "tiny"
    expected = _write_imagefolder(root)
    first = D.load_dataset(root, progress=False)
    cached = sorted((isolated / "cache" / "images").glob("*.pt"))
    assert [p.name.split("-")[:2] for p in cached] == [["tiny", "test"], ["tiny", "train"]]
    assert first.name == "tiny" and first.description == "tiny (ImageFolder)"
    assert first.classes == ("a_cls", "b_cls", "c_cls")  # sorted, as ImageFolder
    assert first.train_images.shape == (12, 3, 8, 8) and first.test_images.shape == (6, 3, 8, 8)
    # every image is where its file says: pixel (1, 1) encodes class and index
    files = {s: [(c, i) for c in first.classes for i in range(4 if s == "train" else 2)] for s in ("train", "test")}
    for split in ("train", "test"):
        images = getattr(first, f"{split}_images")
        labels = getattr(first, f"{split}_labels")
        for image, label, index in zip(images, labels, getattr(first, f"{split}_indices")):
            c, i = files[split][int(index)]
            assert first.classes[int(label)] == c
            assert int(image[0, 1, 1]) == expected[(split, c, i)]  # lossless PNG
    # the second load reads the cache, decodes nothing, gives the same tensors
    decode = D._decode_split
    monkeypatch.setattr(D, "_decode_split", lambda *a, **k: pytest.fail("decoded again"))
    second = D.load_dataset(root, progress=False)
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_labels, second.test_labels)
    assert first.mean == second.mean and first.std == second.std
    # a new file changes the listing's fingerprint: decoded again
    monkeypatch.setattr(D, "_decode_split", decode)
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "a_cls" / "0099.png")
    third = D.load_dataset(root, progress=False)
    assert len(third.train_labels) == 13


def test_imagefolder_jpeg_quality_goes_into_the_description(isolated):
    root = isolated / "cifar10"
    from PIL import Image

    for split in ("train", "test"):
        for c in D.CIFAR10_CLASSES:
            (root / split / c).mkdir(parents=True)
            Image.fromarray(np.full((32, 32, 3), 99, np.uint8)).save(root / split / c / "0000.jpg", quality=75)
    ds = D.load_dataset("cifar10", root=isolated, progress=False)  # ImageFolder layout found by name
    assert ds.description == "CIFAR-10 (JPEG q75 copy)" and ds.classes == D.CIFAR10_CLASSES


def _write_torchvision_cifar10(folder: Path, per_batch=6, test=20) -> dict:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    batches = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, n)]}
        batches[name] = batch
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(D.CIFAR10_CLASSES)}, f)
    return batches


def test_torchvision_format_is_found_first_and_read_exactly(isolated, publish_cifar_files):
    folder = isolated / "ext" / "cifar-10-batches-py"
    batches = _write_torchvision_cifar10(folder)
    publish_cifar_files(folder)
    ds = D.load_dataset("cifar10", progress=False)
    assert ds.description == "CIFAR-10" and ds.source == str(isolated / "ext" / "cifar-10-batches-py")
    train = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    test = batches["test_batch"]["data"].reshape(-1, 3, 32, 32)
    assert torch.equal(ds.train_images, torch.from_numpy(train[ds.train_indices.numpy()]))
    assert torch.equal(ds.test_images, torch.from_numpy(test[ds.test_indices.numpy()]))
    assert ds.test_labels.tolist() == [batches["test_batch"]["labels"][i] for i in ds.test_indices.tolist()]


def test_balanced_order_is_interleaved_and_seeded():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 9)
    order = D.balanced_order(labels, seed=5)
    assert sorted(order.tolist()) == list(range(18))
    assert labels[order[:9]].tolist() == [0, 1, 2] * 3  # interleaved while every class lasts
    assert torch.equal(D.balanced_order(labels, 7, seed=5), order[:7])
    assert torch.equal(D.balanced_order(labels, seed=5), order)
    assert not torch.equal(D.balanced_order(labels, seed=6), order)
    with pytest.raises(ValueError, match=r"size: got 19; allowed values are None \(all\) or integers 1..18"):
        D.balanced_order(labels, 19)


# ---------------------------------------------------------------------------------------------
# the real CIFAR-10 (JPEG copy), when MNV2_DATA_DIR holds it


def _real_cifar10_folder() -> Path | None:
    ext = paths.external_data_dir()
    return ext / "cifar10" if ext is not None and (ext / "cifar10" / "train").is_dir() else None


needs_cifar10 = pytest.mark.skipif(_real_cifar10_folder() is None,
                                   reason=f"set {paths.DATA_ENV_VAR} to a folder holding cifar10/train and "
                                          "cifar10/test (the ImageFolder CIFAR-10 copy) to test the real loader")


@pytest.fixture(scope="module")
def cifar10_full():
    return D.load_dataset("cifar10", progress=False)  # decoded once, then read from data/cache/


@needs_cifar10
def test_real_cifar10_full_counts_classes_and_statistics(cifar10_full):
    ds = cifar10_full
    assert ds.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert ds.train_images.shape == (50000, 3, 32, 32) and ds.test_images.shape == (5000, 3, 32, 32)
    assert torch.bincount(ds.train_labels).tolist() == [5000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [500] * 10
    assert ds.description == "CIFAR-10 (JPEG q75 copy)" and ds.source == str(_real_cifar10_folder())
    assert ds.mean == pytest.approx(CIFAR10_MEAN, abs=5e-4)  # the published mean
    assert ds.std == pytest.approx((0.2470, 0.2435, 0.2616), rel=0.03)
    # the file each image came from: test/<class>/NNNN.jpg, sorted
    from PIL import Image

    for k in (0, 1, 4999):
        index = int(ds.test_indices[k])
        cls, number = divmod(index, 500)
        assert ds.classes[int(ds.test_labels[k])] == ds.classes[cls]
        with Image.open(_real_cifar10_folder() / "test" / ds.classes[cls] / f"{number:04d}.jpg") as im:
            pil = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        assert (pil.int() - ds.test_images[k].int()).abs().max() <= 1  # libjpeg-turbo in both


@needs_cifar10
def test_real_cifar10_subset_is_balanced_seeded_and_fast_from_cache(cifar10_full):
    t0 = time.perf_counter()
    small = D.load_dataset("cifar10", train_size=1000, test_size=200, seed=0, progress=False)
    seconds = time.perf_counter() - t0
    assert seconds < 10, f"loading from the cache took {seconds:.1f} s"
    assert torch.bincount(small.train_labels).tolist() == [100] * 10
    assert torch.bincount(small.test_labels[:50], minlength=10).tolist() == [5] * 10  # prefixes balanced
    again = D.load_dataset("cifar10", train_size=1000, test_size=200, seed=0, progress=False)
    other = D.load_dataset("cifar10", train_size=1000, test_size=200, seed=1, progress=False)
    assert torch.equal(small.train_images, again.train_images)
    assert not torch.equal(small.train_indices, other.train_indices)
    assert small.mean == pytest.approx(D.channel_stats(small.train_images)[0])
    assert small.mean != cifar10_full.mean  # statistics of the subset, not of the full set


# ---------------------------------------------------------------------------------------------
# normalization, augmentation, batching


def test_normalize_matches_the_formula():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    m, s = torch.tensor(mean).view(1, 3, 1, 1).double(), torch.tensor(std).view(1, 3, 1, 1).double()
    expected = (x.double() / 255 - m) / s
    out = D.normalize(x, mean, std)
    assert out.dtype == torch.float32 and torch.allclose(out.double(), expected, atol=1e-5)
    assert torch.allclose(D.normalize(x[0], mean, std), out[0])
    with pytest.raises(ValueError, match="std: got"):
        D.normalize(x, mean, (0.2, 0.0, 0.5))


def test_channel_stats_are_exact():
    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    mean, std = D.channel_stats(x)
    ref = x.double().div(255).transpose(0, 1).reshape(3, -1)
    assert mean == pytest.approx(ref.mean(1).tolist(), abs=1e-12)
    assert std == pytest.approx(ref.std(1, unbiased=False).tolist(), abs=1e-12)


def test_crop_flip_against_a_hand_made_image():
    image = (torch.arange(3 * 6 * 7) % 250 + 1).to(torch.uint8).view(1, 3, 6, 7)  # no zeros inside
    padded = np.pad(image.numpy()[0], ((0, 0), (2, 2), (2, 2)))
    for top in range(5):
        for left in range(5):
            for flip in (False, True):
                out = D.crop_flip(image, torch.tensor([top]), torch.tensor([left]), torch.tensor([flip]), padding=2)
                expected = padded[:, top:top + 6, left:left + 7]
                if flip:
                    expected = expected[:, :, ::-1]
                assert np.array_equal(out[0].numpy(), expected), (top, left, flip)
    # a concrete case: offset (0, 0) puts two rows and columns of zero padding at the top left
    out = D.crop_flip(image, torch.tensor([0]), torch.tensor([0]), torch.tensor([False]), padding=2)[0]
    assert out[:, :2].eq(0).all() and out[:, :, :2].eq(0).all() and torch.equal(out[:, 2:, 2:], image[0, :, :4, :5])
    flipped = D.crop_flip(image, torch.tensor([2]), torch.tensor([2]), torch.tensor([True]), padding=2)[0]
    assert torch.equal(flipped, image[0].flip(-1))


def test_random_crop_flip_draws_every_offset_and_both_flips():
    g = torch.Generator().manual_seed(0)
    image = torch.zeros(1, 1, 9, 9, dtype=torch.uint8)
    image[0, 0, 4, 4] = 255  # track where the centre pixel lands
    batch = image.expand(4000, 1, 9, 9).contiguous()
    out = D.random_crop_flip(batch, g, padding=4)
    where = out.flatten(1).argmax(1)
    rows, cols = (where // 9).tolist(), (where % 9).tolist()
    assert set(rows) == set(range(9)) and set(cols) == set(range(9))
    assert (out.flatten(1).max(1).values == 255).float().mean() > 0.15  # centre visible often


def _loader(images, labels, **kw):
    defaults = dict(batch_size=32, train=True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), seed=0)
    return D.BatchLoader(images, labels, **{**defaults, **kw})


def test_batch_loader_shapes_ranges_len_and_labels():
    x, y = D.make_synthetic(100, seed=0)
    train = _loader(x, y, drop_last=True)
    assert len(train) == 3
    batches = list(train)
    assert len(batches) == 3
    for xb, yb in batches:
        assert xb.shape == (32, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert xb.min() >= (0 - 0.5) / 0.25 - 1e-6 and xb.max() <= (1 - 0.5) / 0.25 + 1e-6
        assert xb.is_contiguous()
    seen = torch.cat([yb for _, yb in batches])
    assert len(set(torch.cat([b[1] for b in batches]).tolist())) == 10 and len(seen) == 96
    assert len(_loader(x, y, drop_last=False)) == 4 and [len(b[1]) for b in _loader(x, y)] == [32, 32, 32, 4]
    cl = next(iter(_loader(x, y, channels_last=True)))[0]
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()


def test_batch_loader_is_deterministic_given_the_seed():
    x, y = D.make_synthetic(64, seed=0)
    a = [b for b in _loader(x, y, seed=7)]
    b = [b for b in _loader(x, y, seed=7)]
    c = [b for b in _loader(x, y, seed=8)]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0]) and not torch.equal(a[0][1], c[0][1])
    loader = _loader(x, y, seed=7)
    assert torch.equal(next(iter(loader))[0], next(iter(loader))[0])  # every iteration restarts the seed


def test_batch_loader_shuffles_and_augments_only_in_train_mode():
    x, y = D.make_synthetic(64, seed=0)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    evaluation = list(D.BatchLoader(x, y, 24, train=False, mean=mean, std=std))
    assert torch.equal(torch.cat([b[1] for b in evaluation]), y)
    assert torch.allclose(torch.cat([b[0] for b in evaluation]), D.normalize(x, mean, std))
    train = list(D.BatchLoader(x, y, 64, train=True, mean=mean, std=std, seed=0))
    xb, yb = train[0]
    assert sorted(yb.tolist()) == sorted(y.tolist()) and not torch.equal(yb, y)  # a permutation
    # each augmented image is a crop/flip of its source: match it among the 162 possibilities
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(yb, y[perm])
    source = x[perm[:8]]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    augmented_uint8 = ((xb[:8] * s + m) * 255).round()
    with D.torch_threads(1):
        candidates = torch.stack([D.crop_flip(source, torch.full((8,), top), torch.full((8,), left),
                                              torch.full((8,), flip, dtype=torch.bool))
                                  for top in range(9) for left in range(9) for flip in (False, True)], 1).float()
    matches = (candidates - augmented_uint8[:, None]).abs().amax(dim=(2, 3, 4)) < 0.5
    assert matches.any(1).all()
    assert not matches[:, 4 * 18 + 4 * 2].all()  # not all images left unchanged (centre, no flip)


def test_batch_loader_moves_batches_to_the_device():
    x, y = D.make_synthetic(40, seed=0)
    xb, yb = next(iter(_loader(x, y, device="cpu")))
    assert xb.device.type == "cpu" and yb.device.type == "cpu"
    if torch.cuda.is_available():  # augmentation on the GPU gives the same batch as on the CPU
        cuda = next(iter(_loader(x, y, device="cuda")))
        assert torch.allclose(cuda[0].cpu(), xb) and torch.equal(cuda[1].cpu(), yb)


def test_batch_loader_rejects_bad_input():
    x, y = D.make_synthetic(10, seed=0)
    with pytest.raises(ValueError, match="images: got torch.float32"):
        D.BatchLoader(x.float(), y)
    with pytest.raises(ValueError, match="labels: got 9 labels for 10 images"):
        D.BatchLoader(x, y[:9])
    with pytest.raises(ValueError, match="batch_size: got 0"):
        D.BatchLoader(x, y, 0)
