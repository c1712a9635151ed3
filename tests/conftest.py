import hashlib
import os

import pytest
import torch

# One thread per worker when pytest-xdist runs two workers on the two cores, and in the processes a test
# starts (notebook kernels, export and training workers): a two-thread OpenMP team beside the other worker
# spins for a core it does not get (notebooks ran 3-4x slower than alone).
_threads = os.environ.get("MNV2_TEST_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
torch.set_num_threads(int(_threads))
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = _threads

# Files that take minutes, longest first. `make test` hands whole files to the two workers in collection
# order (--dist loadfile --no-loadscope-reorder), so these start first and the short ones fill in beside them.
_LONG_FILES = ("test_notebooks.py", "test_deploy.py", "test_browser.py")


def pytest_configure(config):
    """Under xdist, in the controller before the workers start: the kernel libraries built side by side. On a
    cold cache the first worker to need a library otherwise compiles the three one after another while the
    other worker waits on their locks (~100 s of one busy core)."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None):
        return
    from concurrent.futures import ThreadPoolExecutor

    from mnv2lib.ops import build, kernels

    def build_quietly(name):
        try:
            build.build(name)
        except Exception:  # noqa: BLE001 - a worker that needs the library reports the failure in its test
            pass

    with ThreadPoolExecutor(2) as pool:  # the largest first
        list(pool.map(build_quietly, sorted(kernels.LIBRARIES, key=lambda n: -build.sources(n)[0].stat().st_size)))


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file


# Three stages of MobileNetV2's table (t = 1 and t = 6 blocks, stride 1 and 2, a residual block, the last width):
# every kind of layer of the 17-block network, traced, exported and lowered in a fraction of the time
SHALLOW_V2_TABLE = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 320, 1, 2]]


def build_shallow_v2(**config):
    """``build_model(**config)`` of a MobileNetV2 with ``SHALLOW_V2_TABLE``'s blocks (tests import it)."""
    from unittest import mock

    from mnv2lib import build_model
    from mnv2lib.models import mobilenetv2

    with mock.patch.object(mobilenetv2, "INVERTED_RESIDUAL_SETTING", SHALLOW_V2_TABLE):
        model = build_model(**config)
    assert len(model.features) == 1 + sum(n for _, _, n, _ in SHALLOW_V2_TABLE) + 1  # stem, blocks, last 1x1
    return model


def n_params(model) -> int:
    """Every parameter of ``model``, counted here (the parity tests check the library's own counts)."""
    return sum(p.numel() for p in model.parameters())


def png_bytes(fig, min_size: int = 5000) -> bytes:
    """``fig`` rendered as PNG, checked to be one (and at least ``min_size`` bytes: not a blank canvas)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= min_size
    return data


def randomized(module):
    """``module`` with normal random parameters and floating buffers (BN statistics) in [0.5, 1.5], in place:
    a freshly initialised module hides mistakes behind zeros and ones."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
        for b in module.buffers():
            if b.dtype.is_floating_point:
                b.uniform_(0.5, 1.5)
    return module


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smoke_reports_dir(tmp_path_factory):
    """One temporary reports folder for every test that executes notebooks (papermill or the
    browser): a smoke model trained by one is read back by the next, as in ``make reports``."""
    return tmp_path_factory.mktemp("smoke-reports")


@pytest.fixture
def publish_cifar_files(monkeypatch):
    """``publish(folder)``: small fake CIFAR files in torchvision's format stand for the release, so
    that their MD5s pass the check that keeps every other pickle from being unpickled."""
    from mnv2lib.engine import data

    def publish(folder):
        published = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
        monkeypatch.setattr(data, "_published_md5", lambda name: published)

    return publish
