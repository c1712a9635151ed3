"""mnv2lib.corruptions: CIFAR-10-C corruptions against their reference definitions, severity
ordering, determinism, and the corrupted test sets (generated + cached, or the official files)."""
import colorsys
import io
import pickle
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from mnv2lib.engine import corruptions as C
from mnv2lib.engine import data as D
from mnv2lib.utils import paths


@pytest.fixture(scope="module")
def images():
    """48 synthetic test images (class-balanced), uint8 (N, 3, 32, 32)."""
    return D.make_synthetic(48, seed=11)[0]


@pytest.fixture(scope="module")
def changes(images):
    """Mean absolute change from the clean images, per corruption and severity."""
    return {c: [(C.corrupt(images, c, s, seed=0).float() - images.float()).abs().mean().item() for s in C.SEVERITIES]
            for c in C.CORRUPTIONS}


def _grey(value, n=8):
    return torch.full((n, 3, 32, 32), value, dtype=torch.uint8)


def _nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------
# the API


def test_names_severities_and_errors(images):
    assert len(C.CORRUPTIONS) == 15 and len(set(C.CORRUPTIONS)) == 15 and C.SEVERITIES == (1, 2, 3, 4, 5)
    assert sorted(sum(C.CORRUPTION_FAMILIES.values(), ())) == sorted(C.CORRUPTIONS)
    assert set(C.PARAMETERS) == set(C.CORRUPTIONS) and all(len(v) == 5 for v in C.PARAMETERS.values())
    with pytest.raises(ValueError) as info:
        C.corrupt(images, "rain", 1)
    message = str(info.value)
    assert message.startswith("corruption: got 'rain'; allowed values are") and "'jpeg_compression'" in message
    for bad in (0, 6, 2.0, True, "3"):
        with pytest.raises(ValueError, match=r"severity: got .*; allowed values are \(1, 2, 3, 4, 5\)"):
            C.corrupt(images, "fog", bad)
    with pytest.raises(ValueError, match="images: got torch.float32"):
        C.corrupt(images.float(), "fog", 1)
    with pytest.raises(ValueError, match=r"images: .*\(N, 3, 32, 32\)"):
        C.corrupt(images[:, :, :16], "fog", 1)


def test_shapes_dtypes_and_single_images(images):
    for c in C.CORRUPTIONS:
        out = C.corrupt(images[:4], c, 3, seed=0)
        assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8 and out.is_contiguous(), c
    single = C.corrupt(images[0], "gaussian_noise", 2, seed=5)
    assert single.shape == (3, 32, 32)
    assert torch.equal(single, C.corrupt(images[:1], "gaussian_noise", 2, seed=5)[0])


def test_deterministic_given_the_seed(images):
    random = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
              "elastic_transform"}
    for c in C.CORRUPTIONS:
        a = C.corrupt(images[:8], c, 4, seed=1)
        assert torch.equal(a, C.corrupt(images[:8], c, 4, seed=1)), c
        b = C.corrupt(images[:8], c, 4, seed=2)
        assert torch.equal(a, b) == (c not in random), c  # only the random ones depend on the seed


# ---------------------------------------------------------------------------------------------
# definitions


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_brightness_is_the_hsv_value_shift(images, severity):
    c = C.PARAMETERS["brightness"][severity - 1]
    out = _nhwc(C.corrupt(images[:2], "brightness", severity))
    src = _nhwc(images[:2]) / 255.0
    expected = np.empty_like(out)
    for idx in np.ndindex(src.shape[:3]):
        h, s, v = colorsys.rgb_to_hsv(*src[idx])
        rgb = colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
        expected[idx] = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    assert np.abs(out.astype(int) - expected).max() <= 1  # float rounding at the truncation edge
    assert (out == expected).mean() > 0.99
    black = C.corrupt(_grey(0, 1), "brightness", severity)
    assert black.unique().tolist() == [int(c * 255)]  # V = 0: grey at V = c (then truncated)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_contrast_scales_around_the_per_channel_mean(images, severity):
    c = C.PARAMETERS["contrast"][severity - 1]
    x = images[:4].double() / 255
    means = x.mean(dim=(2, 3), keepdim=True)
    expected = (((x - means) * c + means).clamp(0, 1) * 255).to(torch.uint8)  # truncation, as np.uint8
    out = C.corrupt(images[:4], "contrast", severity)
    assert (out.int() - expected.int()).abs().max() <= 1 and (out == expected).float().mean() > 0.99


def test_gaussian_noise_statistics():
    grey = _grey(128, 32)
    for severity, sigma in zip(C.SEVERITIES, C.PARAMETERS["gaussian_noise"]):
        diff = C.corrupt(grey, "gaussian_noise", severity, seed=3).double() - 128
        assert diff.std().item() == pytest.approx(sigma * 255, rel=0.03)
        assert diff.mean().item() == pytest.approx(-0.5, abs=0.3)  # zero-mean noise, then truncation


def test_shot_noise_statistics():
    grey = _grey(102, 32)  # 0.4 of full scale
    for severity, photons in zip(C.SEVERITIES, C.PARAMETERS["shot_noise"]):
        out = C.corrupt(grey, "shot_noise", severity, seed=3).double() / 255
        lam = 0.4 * photons
        assert out.mean().item() == pytest.approx(0.4 - 0.5 / 255, abs=0.004)
        assert out.var().item() == pytest.approx(lam / photons ** 2, rel=0.06)  # Poisson(lam) / photons
        # only k / photons for whole photon counts k occur (then truncated to 8 bits)
        allowed = set((np.clip(np.arange(2 * photons) / photons, 0, 1) * 255).astype(np.uint8).tolist())
        assert set(torch.unique((out * 255).round()).int().tolist()) <= allowed


def test_impulse_noise_hits_the_right_fraction_of_values():
    grey = _grey(100, 32)
    for severity, amount in zip(C.SEVERITIES, C.PARAMETERS["impulse_noise"]):
        out = C.corrupt(grey, "impulse_noise", severity, seed=3)
        salt, pepper = (out == 255).double().mean().item(), (out == 0).double().mean().item()
        assert salt + pepper == pytest.approx(amount, rel=0.12)
        assert salt == pytest.approx(pepper, rel=0.3)
        assert ((out == 255) | (out == 0) | (out == 99) | (out == 100)).all()  # the rest is untouched
        # values are hit independently per channel, as skimage's random_noise
        hit = (out == 0) | (out == 255)
        assert (hit.any(1) & ~hit.all(1)).any()


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_jpeg_compression_is_a_pil_round_trip(images, severity):
    quality = C.PARAMETERS["jpeg_compression"][severity - 1]
    out = _nhwc(C.corrupt(images[:3], "jpeg_compression", severity))
    for i, array in enumerate(_nhwc(images[:3])):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "JPEG", quality=quality)
        assert np.array_equal(out[i], np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_pixelate_is_a_box_down_and_up_resize(images, severity):
    side = int(32 * C.PARAMETERS["pixelate"][severity - 1])
    out = _nhwc(C.corrupt(images[:3], "pixelate", severity))
    for i, array in enumerate(_nhwc(images[:3])):
        box = Image.Resampling.BOX
        expected = Image.fromarray(array).resize((side, side), box).resize((32, 32), box)
        assert np.array_equal(out[i], np.asarray(expected))
    assert side == (30, 28, 27, 24, 20)[severity - 1]


def test_glass_shuffle_equals_the_reference_loop():
    """The reference's loop, verbatim (its swap through numpy views is really a copy)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    for delta, passes in ((1, 2), (2, 1)):
        positions = len(range(32 - delta, delta, -1)) ** 2
        offsets = rng.integers(-delta, delta, size=(passes, positions, 2, 3))
        ours = C.glass_shuffle(x, offsets, delta)
        for i in range(3):
            ref = x[i].copy()
            for it in range(passes):
                k = 0
                for h in range(32 - delta, delta, -1):
                    for w in range(32 - delta, delta, -1):
                        dx, dy = offsets[it, k, :, i]
                        k += 1
                        h_prime, w_prime = h + dy, w + dx
                        # swap
                        ref[h, w], ref[h_prime, w_prime] = ref[h_prime, w_prime], ref[h, w]
            assert np.array_equal(ours[i], ref), (delta, i)
    assert not np.array_equal(ours, x)


@pytest.mark.parametrize("zoom", [1.0, 1.01, 1.05, 1.13, 1.25, 1.75, 2.25])
def test_clipped_zoom_matches_scipy(zoom):
    img = np.random.default_rng(1).random((32, 32, 3)).astype(np.float32)
    ch = int(np.ceil(32 / zoom))
    top = (32 - ch) // 2
    zoomed = ndimage.zoom(img[top:top + ch, top:top + ch], (zoom, zoom, 1), order=1)
    trim = (zoomed.shape[0] - 32) // 2
    assert np.abs(C._clipped_zoom(img[None], zoom)[0] - zoomed[trim:trim + 32, trim:trim + 32]).max() < 1e-5


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_elastic_transform_matches_scipy(severity):
    """The reference's warpAffine (reflect-101) + map_coordinates (reflect), with scipy."""
    c = C.PARAMETERS["elastic_transform"][severity - 1]
    rng = np.random.default_rng(severity)
    x = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    jitter = rng.uniform(-c[2], c[2], (2, 3, 2)).astype(np.float32)
    fields = rng.uniform(-1, 1, (2, 2, 32, 32))
    ours = C.elastic_apply(x, c, jitter, fields)
    for i in range(2):
        img = x[i].astype(np.float32) / 255.0
        pts1 = np.float32([[26, 26], [26, 6], [6, 6]])
        m = np.linalg.solve(np.c_[pts1, np.ones(3)].astype(np.float64), (pts1 + jitter[i]).astype(np.float64)).T
        inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))  # (x, y) -> source (x, y)
        matrix, offset = [[inv[1, 1], inv[1, 0]], [inv[0, 1], inv[0, 0]]], [inv[1, 2], inv[0, 2]]
        warped = np.stack([ndimage.affine_transform(img[..., k].astype(np.float64), matrix, offset=offset, order=1,
                                                    mode="mirror") for k in range(3)], -1)
        smooth = [ndimage.gaussian_filter(f[i], c[1], mode="reflect", truncate=3) if c[1] else f[i] for f in fields]
        dx, dy = [(s * c[0]).astype(np.float32)[..., None] for s in smooth]
        xx, yy, zz = np.meshgrid(np.arange(32), np.arange(32), np.arange(3))
        idx = np.reshape(yy + dy, (-1, 1)), np.reshape(xx + dx, (-1, 1)), np.reshape(zz, (-1, 1))
        ref = np.clip(ndimage.map_coordinates(warped, idx, order=1, mode="reflect").reshape(32, 32, 3), 0, 1) * 255
        assert np.abs(ours[i] - ref).max() < 1e-6


def test_motion_blur_kernel_and_streak():
    weights, ox, oy = C.motion_blur_kernel(6, 2, 0.0)
    assert len(weights) == 13 and weights.sum() == pytest.approx(1.0)
    assert np.allclose(weights, np.exp(-np.arange(13) ** 2 / 8) / np.exp(-np.arange(13) ** 2 / 8).sum())
    assert ox.tolist() == list(range(13)) and oy.tolist() == [0] * 13
    _, ox, oy = C.motion_blur_kernel(6, 2, 90.0)
    assert ox.tolist() == [0] * 13 and oy.tolist() == list(range(13))
    _, ox, oy = C.motion_blur_kernel(9, 2.5, 45.0)
    assert ox.tolist() == oy.tolist() == [int(np.ceil(i * np.sqrt(0.5) - 0.5)) for i in range(19)]
    # a white dot on black, angle 0: the output at x samples x + i, so the streak runs to the left
    dot = np.zeros((1, 32, 32, 1))
    dot[0, 16, 20, 0] = 255
    out = C._motion_blur_batch(dot, 6, 2, np.array([0.0]))[0, :, :, 0]
    weights, _, _ = C.motion_blur_kernel(6, 2, 0.0)
    assert out[16, 20::-1][:13].tolist() == np.rint(255 * weights).tolist()
    assert out[16, 21:].sum() == 0 and out[:16].sum() == 0 and out[17:].sum() == 0


def test_defocus_kernel_is_the_blurred_disk():
    g = np.exp(-np.arange(-1, 2) ** 2 / (2 * 0.4 ** 2))
    g /= g.sum()
    assert np.allclose(C._disk_kernel(0.3, 0.4), np.outer(g, g), atol=1e-7)  # radius < 1: one pixel, blurred
    plus = C._disk_kernel(1, 0.2)  # radius 1: the centre and its 4 neighbours, blurred
    assert plus.shape == (5, 5) and plus.sum() == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(plus, plus.T) and np.allclose(plus, plus[::-1]) and plus[2, 1] > plus[1, 1]
    flat = C.corrupt(_grey(77, 2), "defocus_blur", 5)
    assert flat.unique().tolist() in ([76], [77])  # a constant image stays constant (up to truncation)


def test_fog_and_frost_building_blocks():
    maps = C._plasma_fractal(4, np.random.default_rng(0), wibbledecay=3)
    assert maps.shape == (4, 32, 32)
    assert np.allclose(maps.min(axis=(1, 2)), 0) and np.allclose(maps.max(axis=(1, 2)), 1)
    assert not np.allclose(maps[0], maps[1])
    plate = C.frost_plate(0)
    assert plate.shape == (C.FROST_PLATE_SIZE, C.FROST_PLATE_SIZE, 3) and plate.min() >= 0 and plate.max() <= 255
    assert 0.4 < plate.mean() / 255 < 0.6 and 0.12 < plate.std() / 255 < 0.3
    assert (plate[..., 2] >= plate[..., 0]).mean() > 0.99  # bluish
    assert not np.allclose(C.frost_plate(0), C.frost_plate(1))
    # frost = c0 * image + c1 * crop: on black, the output is c1 x a crop of a plate
    out = C.corrupt(_grey(0, 4), "frost", 1, seed=0).double()
    assert 0.15 * 255 * 0.3 < out.mean() < 0.25 * 255 * 0.7


# ---------------------------------------------------------------------------------------------
# severity


def test_every_corruption_changes_the_image_at_severity_1(changes):
    for c in C.CORRUPTIONS:
        assert changes[c][0] > 1.0, (c, changes[c][0])


def test_pixel_change_grows_with_severity(changes):
    """Strictly, except where the reference's parameters saturate (motion blur 3 -> 4) or are
    known not to be monotone in pixel change (C.MAE_NON_MONOTONE, tested below)."""
    for c in C.CORRUPTIONS:
        if c in C.MAE_NON_MONOTONE:
            continue
        for s in C.SEVERITIES[:-1]:
            before, after = changes[c][s - 1], changes[c][s]
            if (c, s) in C.MAE_SATURATING:
                assert after >= before * (1 - 1e-3), (c, s, changes[c])
            else:
                assert after > before, (c, s, changes[c])
    # and the documented exceptions are exactly the non-monotone ones
    non_monotone = {c for c in C.CORRUPTIONS if any(b < a * (1 - 1e-3) for a, b in zip(changes[c], changes[c][1:]))}
    assert non_monotone == set(C.MAE_NON_MONOTONE)


def _correlation_distance(a, b):
    a, b = a.double().flatten(1), b.double().flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean().item()


def test_the_reference_non_monotone_corruptions_still_grow_in_their_own_terms(images, changes):
    # frost: the clean image's share falls, so its correlation with the clean image falls
    frost = [_correlation_distance(C.corrupt(images, "frost", s), images) for s in C.SEVERITIES]
    assert all(b > a for a, b in zip(frost, frost[1:])), frost
    # glass blur: two shuffle passes (4, 5) change more than one (1-3) at the same blur sigma
    glass = changes["glass_blur"]
    assert glass[3] > glass[1] and glass[4] > glass[2] and min(glass[3:]) > max(glass[:3])
    # elastic: the local displacement grows; without the (shrinking) affine jitter the change grows
    x = _nhwc(images[:16])
    fields = np.random.default_rng(0).uniform(-1, 1, (2, 16, 32, 32))
    no_jitter = np.zeros((16, 3, 2), np.float32)
    local = [np.abs(C.elastic_apply(x, c, no_jitter, fields).astype(np.uint8) - x.astype(float)).mean()
             for c in C.PARAMETERS["elastic_transform"]]
    assert all(b > a for a, b in zip(local, local[1:])), local
    assert changes["elastic_transform"][0] > changes["elastic_transform"][4]  # the reference's affine shrinks


# ---------------------------------------------------------------------------------------------
# corrupted test sets


def _dataset(name="synthetic", n=40, seed=0):
    x, y = D.make_synthetic(n, seed=seed)
    return types.SimpleNamespace(name=name, test_images=x, test_labels=y, source="procedural", test_indices=None)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setenv(paths.DATA_ENV_VAR, str(tmp_path / "ext"))
    monkeypatch.setattr(paths, "DATA_DIR", tmp_path / "data")
    return tmp_path / "cache"


def test_generated_sets_are_cached_and_keyed(cache_dir, monkeypatch):
    ds = _dataset()
    images, labels = C.load_corrupted_test_set(ds, "fog", 3, size=24)
    assert torch.equal(labels, ds.test_labels[:24])
    assert torch.equal(images, C.corrupt(ds.test_images[:24], "fog", 3, seed=0))
    files = list(cache_dir.glob("corruptions/*/fog-3.pt"))
    assert len(files) == 1 and files[0].parent.name.startswith("synthetic-n24-")
    real_corrupt = C.corrupt
    monkeypatch.setattr(C, "corrupt", lambda *a, **k: pytest.fail("generated again instead of read from the cache"))
    again, _ = C.load_corrupted_test_set(ds, "fog", 3, size=24)
    assert torch.equal(again, images)
    monkeypatch.setattr(C, "corrupt", real_corrupt)
    # another seed, size, severity or test set is another entry
    other_seed, _ = C.load_corrupted_test_set(ds, "fog", 3, size=24, seed=1)
    assert not torch.equal(other_seed, images)
    C.load_corrupted_test_set(ds, "fog", 4, size=24)
    C.load_corrupted_test_set(ds, "fog", 3, size=20)
    changed = _dataset(seed=1)
    C.load_corrupted_test_set(changed, "fog", 3, size=24)
    assert len(list(cache_dir.glob("corruptions/*/*.pt"))) == 5
    # a damaged cache file is regenerated
    files[0].write_bytes(b"not a tensor")
    with pytest.warns(UserWarning, match="unreadable"):
        repaired, _ = C.load_corrupted_test_set(ds, "fog", 3, size=24)
    assert torch.equal(repaired, images)
    with pytest.warns(UserWarning, match="size: asked for 41 images, the dataset's test split has 40; using 40"):
        whole, _ = C.load_corrupted_test_set(ds, "fog", 3, size=41)
    assert torch.equal(whole, C.load_corrupted_test_set(ds, "fog", 3)[0]) and len(whole) == 40
    with pytest.raises(ValueError, match=r"size: got 0; allowed values are None or integers >= 1"):
        C.load_corrupted_test_set(ds, "fog", 3, size=0)
    with pytest.raises(ValueError, match="corruption: got 'haze'"):
        C.load_corrupted_test_set(ds, "haze", 3)


def _write_official(folder: Path, test_images: np.ndarray, test_labels: np.ndarray, corruption="fog"):
    """A miniature CIFAR-10-C: severity s stores the clean image + 10 s (mod 256), in test order."""
    folder.mkdir(parents=True)
    stacked = np.concatenate([(test_images.astype(int) + 10 * s) % 256 for s in C.SEVERITIES]).astype(np.uint8)
    np.save(folder / f"{corruption}.npy", stacked)
    np.save(folder / "labels.npy", np.tile(test_labels, 5).astype(np.uint8))


def test_official_files_map_to_the_same_test_images(cache_dir, tmp_path, publish_cifar_files):
    """A dataset read from torchvision's files gets exactly its own test images, corrupted."""
    rng = np.random.default_rng(0)
    tv = tmp_path / "ext" / "cifar-10-batches-py"
    tv.mkdir(parents=True)
    test = rng.integers(0, 256, (30, 3072), dtype=np.uint8)
    test_labels = np.arange(30) % 10
    for name, batch in [(f"data_batch_{i}", {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                                              "labels": list(range(10))}) for i in range(1, 6)] + \
                       [("test_batch", {"data": test, "labels": test_labels.tolist()})]:
        with open(tv / name, "wb") as f:
            pickle.dump(batch, f)
    with open(tv / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(D.CIFAR10_CLASSES)}, f)
    publish_cifar_files(tv)
    nhwc = test.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    _write_official(tmp_path / "ext" / "CIFAR-10-C", nhwc, test_labels)
    ds = D.load_dataset("cifar10", test_size=20, progress=False)
    images, labels = C.load_corrupted_test_set(ds, "fog", 2, size=12)
    expected = (ds.test_images[:12].int() + 20) % 256
    assert torch.equal(images.int(), expected) and torch.equal(labels, ds.test_labels[:12])
    assert not list(cache_dir.glob("corruptions/*/*.pt"))  # nothing generated
    # a corruption without a file is generated; official=True insists on the files
    generated, _ = C.load_corrupted_test_set(ds, "snow", 2, size=12)
    assert torch.equal(generated, C.corrupt(ds.test_images[:12], "snow", 2))
    with pytest.raises(D.DatasetNotFoundError, match="snow.npy is missing"):
        C.load_corrupted_test_set(ds, "snow", 2, size=12, official=True)
    # official=False ignores the files
    own, _ = C.load_corrupted_test_set(ds, "fog", 2, size=12, official=False)
    assert torch.equal(own, C.corrupt(ds.test_images[:12], "fog", 2))


def test_official_files_for_another_copy_give_a_balanced_official_subset(cache_dir, tmp_path):
    official = np.random.default_rng(1).integers(0, 256, (50, 32, 32, 3)).astype(np.uint8)
    official_labels = np.arange(50) % 10
    _write_official(tmp_path / "ext" / "CIFAR-10-C", official, official_labels)
    ds = _dataset(name="cifar10", n=40)  # e.g. the JPEG copy: no correspondence with the official order
    images, labels = C.load_corrupted_test_set(ds, "fog", 5, size=20, seed=3)
    assert torch.bincount(labels).tolist() == [2] * 10
    idx = D.balanced_order(torch.as_tensor(official_labels), 20, seed=3)
    assert torch.equal(labels, torch.as_tensor(official_labels)[idx])
    expected = torch.from_numpy((official.astype(int) + 50) % 256).permute(0, 3, 1, 2)[idx]
    assert torch.equal(images.int(), expected)
    synthetic = _dataset(name="synthetic")
    with pytest.raises(D.DatasetNotFoundError, match="no official corrupted files for dataset 'synthetic'"):
        C.load_corrupted_test_set(synthetic, "fog", 5, official=True)


def test_generating_a_whole_benchmark_is_quick(cache_dir):
    """All 75 sets of 64 images (the smoke profile's size): a few seconds."""
    import time

    ds = _dataset(n=64)
    t0 = time.perf_counter()
    for c in C.CORRUPTIONS:
        for s in C.SEVERITIES:
            C.load_corrupted_test_set(ds, c, s)
    assert time.perf_counter() - t0 < 30
    assert len(list(cache_dir.glob("corruptions/*/*.pt"))) == 75
