import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("MNV2_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smoke_reports_dir(tmp_path_factory):
    """One temporary reports folder for every test that executes notebooks (papermill or the
    browser): a smoke model trained by one is read back by the next, as in ``make reports``."""
    return tmp_path_factory.mktemp("smoke-reports")
