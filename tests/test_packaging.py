"""The project's own files stay consistent: environment.yml, pyproject.toml, README, Makefile."""
import re
import subprocess
import tomllib

import yaml

from mnv2lib.utils import paths

ROOT = paths.PROJECT_ROOT


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_installs_the_project_and_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "conda-forge" in env["channels"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip_blocks = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_blocks) == 1
    assert {"pip"} <= {_name(d) for d in conda}
    python = next(d for d in conda if _name(d) == "python")
    minimum = _pyproject()["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, python.split("=")[-1].split("."))) >= tuple(map(int, minimum.split(".")))
    # The pip block installs the project with its dev extras, so pyproject.toml is the one list
    # of Python packages; conda may only add packages that pyproject.toml also names.
    assert any(re.fullmatch(r"-e \.\[dev\]", line.strip()) for line in pip_blocks[0])
    declared = {_name(r) for r in _pyproject()["project"]["dependencies"]}
    declared |= {_name(r) for r in _pyproject()["project"]["optional-dependencies"]["dev"]}
    extra_conda = {_name(d) for d in conda} - {"python", "pip"}
    assert extra_conda <= declared, f"conda packages not in pyproject.toml: {extra_conda - declared}"
    extra_pip = {_name(line) for line in pip_blocks[0] if not line.strip().startswith("-")}
    assert extra_pip <= declared, f"pip packages not in pyproject.toml: {extra_pip - declared}"


def test_dependency_ranges_admit_the_machine_torch():
    deps = {_name(r): r for r in _pyproject()["project"]["dependencies"]}
    for package in ("torch", "torchvision", "jupyterlab", "matplotlib", "seaborn", "ipywidgets", "papermill",
                    "torchinfo"):
        assert package in deps
    for name, version in (("torch", (2, 14, 1)), ("torchvision", (0, 29, 1))):
        for spec in re.findall(r"(<=|>=|<|>|==)\s*([\d.]+)", deps[name]):
            bound = tuple(int(p) for p in spec[1].split("."))
            ok = {"<=": version <= bound, ">=": version >= bound, "<": version < bound, ">": version > bound,
                  "==": version[: len(bound)] == bound}[spec[0]]
            assert ok, f"{deps[name]} excludes {version}"


def test_readme_first_screen_gives_the_two_commands():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:15])
    commands = re.findall(r"^make (\w+)", first_screen, flags=re.M)
    assert commands == ["reports", "test"]


def test_make_help_lists_the_targets():
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for target in ("test", "reports", "bench", "lab"):
        assert re.search(rf"make {target}\b", out)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "MNV2_DATA_DIR" in ci


def test_data_folder_tracks_only_its_readme():
    ignored = (ROOT / ".gitignore").read_text()
    assert "/data/*" in ignored and "!/data/README.md" in ignored


def test_kernel_sources_ship_as_package_data():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mnv2lib.ops"]
    ops = ROOT / "mnv2lib" / "ops"
    shipped = {p.relative_to(ops) for pattern in data for p in ops.glob(pattern)}
    sources = {p.relative_to(ops) for p in (ops / "csrc").iterdir()}
    assert sources and sources <= shipped


def test_reports_install_only_what_they_run_and_a_dev_install_serves_them(tmp_path):
    """`make reports` on a fresh machine installs the project and its deploy extra, not the test tools;
    after `make install` (the dev extras, which include deploy) it installs nothing more."""
    def planned(target: str) -> str:
        return subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout

    fresh = planned("reports")
    assert '-e ".[deploy]"' in fresh and ".[dev]" not in fresh and "mnv2lib.reports" in fresh
    assert '-e ".[dev]"' in planned("test")
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / ".installed").touch()
    (tmp_path / "venv" / ".installed-run").touch()  # what the dev install's recipe touches
    after_dev = planned("reports")
    assert "pip install" not in after_dev and "mnv2lib.reports" in after_dev
    assert "pip install" not in planned("test")
