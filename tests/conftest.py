import hashlib
import os

import pytest
import torch

# one thread per worker when pytest-xdist runs two workers on the two cores
_default_threads = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
torch.set_num_threads(int(os.environ.get("MNV2_TEST_THREADS", _default_threads)))


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
    from mnv2lib import data

    def publish(folder):
        published = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
        monkeypatch.setattr(data, "_published_md5", lambda name: published)

    return publish
