"""One table of analysis work sizes per profile (mnv2lib.analysis.work_sizes), read by every notebook's
analysis and by the run plan: every known profile and ladder rung resolves, an unknown one is refused."""
from __future__ import annotations

import pytest

from mnv2lib.analysis import cnsn, deployment, design, families
from mnv2lib.analysis.work_sizes import STUDIES, WORK_SIZES, work_sizes
from mnv2lib.runs.profiles import PROFILES, budget_rung
from mnv2lib.workbook.catalogue import NOTEBOOK_SEQUENCE
from mnv2lib.workbook.plan import notebook_requests


def test_every_study_has_sizes_for_every_profile_of_the_table():
    for profile, studies in WORK_SIZES.items():
        assert set(studies) == set(STUDIES), profile


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_and_rung_gets_its_base_profiles_sizes(name):
    base = name.split("_x")[0]
    for study in STUDIES:
        assert work_sizes(name, study) == work_sizes(base, study)


def test_the_gpu_profile_is_not_a_silent_default():
    # the CNSN study used to fall back to 64 images for any profile it did not list, the gpu one included
    assert cnsn.study_plan(PROFILES["gpu"])["images"] == WORK_SIZES["gpu"]["cnsn"]["images"] == 128
    assert families.latency_repeats("gpu") == 10


def test_an_unknown_profile_names_the_known_ones():
    with pytest.raises(ValueError, match=r"profile: got 'huge'; allowed values are \('smoke', 'quick', 'gpu', 'full'\)"):
        work_sizes("huge", "cnsn")
    with pytest.raises(ValueError, match="study: got 'x'"):
        work_sizes("quick", "x")


def test_a_copy_is_returned():
    work_sizes("quick", "deployment")["sizes"]["test_images"] = 1
    assert deployment.deploy_plan("quick").sizes.test_images == 2000


@pytest.mark.parametrize("name", sorted(PROFILES) + ["quick_x32"])
def test_every_notebooks_plan_resolves_for_every_profile(name):
    profile = PROFILES.get(name) or budget_rung(PROFILES["quick"], 32)  # a rung nobody registered
    requests = notebook_requests(profile, seed=0)
    assert list(requests) == list(NOTEBOOK_SEQUENCE)
    assert all(requests[n] for n in NOTEBOOK_SEQUENCE if n != "08_applications")  # 08 trains nothing
    assert design.design_plan(profile).latency_repeats >= 1
