"""The grid on Ray, the results store under concurrency, and DistributedDataParallel (issue 18).

One local Ray cluster (num_cpus=2) is shared by the module: starting one costs ~10-15 s.
Skipped, with the reason, where Ray (the `dist` extra) is not installed.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from mnv2lib.runs import executors as X  # noqa: E402
from mnv2lib.runs import profiles, runner, spec # noqa: E402
from mnv2lib.runs.store import ResultsStore
from mnv2lib.engine.train import TrainConfig
from mnv2lib.workbook import cli
from mnv2lib.workbook.plan import notebook_requests  # noqa: E402

pytestmark = pytest.mark.slow
SMOKE = profiles.get_profile("smoke")
# three epochs, so that a killed run has an epoch checkpoint to resume from
SMOKE_3 = dataclasses.replace(SMOKE, name="smoke_3epochs", train=dataclasses.replace(SMOKE.train, epochs=3))
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset():
    return runner.load_profile_dataset(SMOKE, "synthetic")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(**X.ray_init_kwargs(None, workers=2, threads=1))
    yield
    ray.shutdown()


def _store(root: Path) -> ResultsStore:
    return ResultsStore(root / "results", root / "runs")


def _comparable(record: dict) -> dict:
    """A record's numbers, without timings and dates."""
    return {"history": [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in record["history"]],
            **{k: record[k] for k in ("key", "status", "seed", "model_config", "clean_accuracy",
                                      "corruption_accuracy", "mean_corruption_accuracy", "threads")}}


def _weights(store: ResultsStore, key: str) -> dict:
    return torch.load(store.run_dir(key) / "model.pt", weights_only=True)


def test_ray_trains_four_runs_as_the_local_executor_does(ray_cluster, dataset, tmp_path):
    runs = spec.plan_runs([spec.RunRequest(o, (0,)) for o in spec.ablation_configs()[:4]], SMOKE, dataset)
    assert len(runs) == 4
    on_ray, here = _store(tmp_path / "ray"), _store(tmp_path / "local")
    ray_records = X.train_runs(runs, SMOKE, dataset, on_ray, executor="ray", threads=1, show_progress=False)
    local_records = X.train_runs(runs, SMOKE, dataset, here, executor="local", threads=1, show_progress=False)
    for a, b in zip(ray_records, local_records):
        assert a["status"] == "finished" and a["threads"] == 1
        assert _comparable(a) == _comparable(b)  # same seed, same thread count: the same numbers
        wa, wb = _weights(on_ray, a["key"]), _weights(here, b["key"])
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len(list(on_ray.results_dir.glob("*.json"))) == 4
    # a second call finds every run in the store and starts no task
    assert X.missing_runs(runs, on_ray) == []


def _worker_pids(name: str = "ray::mnv2-run") -> list[int]:
    """Ray worker processes of this test's cluster (descendants of this process) running a run task."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not cmdline.startswith(name):
                continue
            pid = int(proc.name)
            while pid > 1 and pid != os.getpid():  # walk up: only our own cluster's workers
                pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if pid == os.getpid():
            pids.append(int(proc.name))
    return pids


def test_a_killed_worker_is_retried_and_resumes_from_its_checkpoint(ray_cluster, dataset, tmp_path):
    store = _store(tmp_path / "store")
    runs = spec.plan_runs([spec.RunRequest({}, (0,))], SMOKE_3, dataset)
    checkpoint = store.run_dir(runs[0].key) / "checkpoint.pt"
    outcome = {}
    grid = threading.Thread(target=lambda: outcome.update(records=X.train_runs(
        runs, SMOKE_3, dataset, store, executor="ray", threads=1, show_progress=False)))
    grid.start()
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:  # the first epoch's checkpoint is written
        time.sleep(0.02)
    killed = _worker_pids()
    assert checkpoint.exists() and killed, "the run never reached its first checkpoint on a Ray worker"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    grid.join(timeout=180)
    record = outcome["records"][0]
    assert record["status"] == "finished" and record["resumed_from_epoch"] >= 1
    assert [p.name for p in store.results_dir.glob("*.json")] == [f"{record['key']}.json"]  # exactly one record
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".partial")) or p.name == "checkpoint.pt"]
    assert leftovers == []
    # the resumed run ends as an uninterrupted one does (exact resume)
    uninterrupted = X.train_runs(runs, SMOKE_3, dataset, _store(tmp_path / "once"), executor="local", threads=1,
                                 show_progress=False)[0]
    assert _comparable(record) == _comparable(uninterrupted)


SAME_RUN_SCRIPT = """
import json, sys, time
from pathlib import Path
from mnv2lib.runs import profiles, runner, spec
from mnv2lib.runs.store import ResultsStore

trained = []
real = runner.train_model
runner.train_model = lambda *a, **k: trained.append(1) or real(*a, **k)
store = ResultsStore(sys.argv[1] + "/results", sys.argv[1] + "/runs")
profile = profiles.get_profile("smoke")
dataset = runner.load_profile_dataset(profile, "synthetic")
config = spec.model_config_for({}, profile, len(dataset.classes))
Path(sys.argv[1], "ready-" + sys.argv[2]).touch()
while len(list(Path(sys.argv[1]).glob("ready-*"))) < 2:  # both processes ask at the same moment
    time.sleep(0.01)
record = runner.run_experiment(config, profile, dataset, 0, store, show_progress=False)
print(json.dumps({"trained": len(trained), "status": record["status"], "started": record["started"]}))
"""


def test_two_processes_asking_for_the_same_run_train_it_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MNV2_PROGRESS": "off"}
    procs = [subprocess.Popen([sys.executable, "-c", SAME_RUN_SCRIPT, str(tmp_path), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sum(r["trained"] for r in results) == 1
    assert {r["status"] for r in results} == {"finished"} and len({r["started"] for r in results}) == 1
    assert len(list((tmp_path / "results").glob("*.json"))) == 1


# A model without BatchNorm or dropout: there DDP's step is the single-process step exactly (up to the
# order of float sums), which checks the sharding of each global batch and the gradient averaging.
TINY_MODEL = """
def tiny_model():
    from torch import nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
"""
DDP_SCRIPT = TINY_MODEL + """
import hashlib, json, sys
import torch
from mnv2lib.engine.train import TrainConfig, init_distributed, train_model
from mnv2lib.models import build_model
from mnv2lib.runs import profiles, runner, spec
from mnv2lib.runs.store import ResultsStore

rank, world = init_distributed()
torch.set_num_threads(1)
out = sys.argv[1]
profile = profiles.get_profile("smoke")
dataset = runner.load_profile_dataset(profile, "synthetic")
train = TrainConfig(**json.loads(sys.argv[2]))
results = {"world": world}
for name, make in (("mobilenet_v2", lambda: build_model(spec.model_config_for({}, profile, len(dataset.classes)))),
                   ("tiny", tiny_model)):
    torch.manual_seed(0)
    model = make()
    history = train_model(model, dataset, train, seed=0, show_progress=False).history
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.state_dict().values())).hexdigest()
    results[name] = {"history": history, "digest": digest,
                     "weights": [p.detach().flatten().tolist() for p in model.parameters()] if name == "tiny" else None}
# the experiment path: rank 0 holds the run's lock and writes; every rank returns rank 0's record
store = ResultsStore(out + "/store/results", out + "/store/runs")
record = runner.run_experiment(spec.model_config_for({}, profile, len(dataset.classes)), profile, dataset, 0, store,
                          show_progress=False)
results["record"] = {k: record.get(k) for k in ("key", "status", "world_size", "clean_accuracy")}
json.dump(results, open(f"{out}/rank{rank}.json", "w"))
"""
DDP_TRAIN = dict(epochs=3, batch_size=64, lr=0.05, eval_batch_size=256)
# MobileNetV2 with per-rank BatchNorm (torch has no SyncBatchNorm on the CPU; on CUDA the engine uses it):
# each rank normalizes its 32 images with their own statistics where one process uses the batch's 64,
# and dropout draws its masks per shard. That changes the math: on the 4-step smoke epochs the curves
# differed by up to 0.08 nats (measured), so this bound only says "the same training, not another one".
DDP_BN_LOSS_TOLERANCE = 0.15
# Without BatchNorm and dropout the step is the same; only the order of float sums differs.
DDP_EXACT_TOLERANCE = 1e-5


def _single_process(make_model, dataset) -> tuple[list[dict], torch.nn.Module]:
    from mnv2lib.engine.train import train_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = make_model()
        return train_model(model, dataset, TrainConfig(**DDP_TRAIN), seed=0, show_progress=False).history, model
    finally:
        torch.set_num_threads(threads)


def test_ddp_with_gloo_on_two_processes_follows_the_single_process_loss_curve(dataset, tmp_path):
    from mnv2lib.models import build_model

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MNV2_PROGRESS": "off"}
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path), json.dumps(DDP_TRAIN)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    for name in ("mobilenet_v2", "tiny"):  # every rank ends with the same weights and BN statistics
        assert ranks[0][name]["digest"] == ranks[1][name]["digest"]
        numbers = [[{k: v for k, v in h.items() if k != "epoch_seconds"} for h in r[name]["history"]] for r in ranks]
        assert numbers[0] == numbers[1]

    assert ranks[0]["record"] == ranks[1]["record"] and ranks[0]["record"]["status"] == "finished"
    assert ranks[0]["record"]["world_size"] == 2
    assert len(list((tmp_path / "store" / "results").glob("*.json"))) == 1  # written once, by rank 0

    namespace = {}
    exec(TINY_MODEL, namespace)
    tiny_history, tiny = _single_process(namespace["tiny_model"], dataset)
    ddp, single = ([h["train_loss"] for h in hist] for hist in (ranks[0]["tiny"]["history"], tiny_history))
    assert ddp == pytest.approx(single, rel=DDP_EXACT_TOLERANCE)
    ddp_weights = torch.cat([torch.tensor(w) for w in ranks[0]["tiny"]["weights"]])
    single_weights = torch.cat([p.detach().flatten() for p in tiny.parameters()])
    assert torch.allclose(ddp_weights, single_weights, atol=DDP_EXACT_TOLERANCE)

    mnv2_history, _ = _single_process(lambda: build_model(spec.model_config_for({}, SMOKE, len(dataset.classes))),
                                      dataset)
    ddp, single = ([h["train_loss"] for h in hist] for hist in (ranks[0]["mobilenet_v2"]["history"], mnv2_history))
    print("MobileNetV2 train loss per epoch, DDP 2 x 32:", ddp, "one process x 64:", single)
    assert len(ddp) == len(single) == DDP_TRAIN["epochs"]
    assert ddp != single  # it really ran sharded: per-rank BN makes it differ a little
    assert max(abs(a - b) for a, b in zip(ddp, single)) < DDP_BN_LOSS_TOLERANCE, (ddp, single)


def test_bad_executor_options_name_the_field(monkeypatch):
    with pytest.raises(ValueError, match="executor: got 'dask'"):
        X.check_options("dask")
    monkeypatch.setenv("MNV2_EXECUTOR", "spark")
    with pytest.raises(ValueError, match="MNV2_EXECUTOR: got 'spark'"):
        X.check_options()
    assert X.check_options("local", workers=2) == "local"  # side by side in processes, no Ray needed
    with pytest.raises(ValueError, match="workers: got 0"):
        X.check_options("local", workers=0)
    with pytest.raises(ValueError, match="threads: got 0"):
        X.check_options("ray", threads=0)


def test_ranks_share_each_global_batch_exactly():
    from mnv2lib.engine.data import BatchLoader

    images = torch.randint(0, 255, (40, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(40)
    options = dict(batch_size=8, train=True, mean=(0.5,) * 3, std=(0.25,) * 3, seed=3, drop_last=True)
    whole = list(BatchLoader(images, labels, **options))
    shards = [list(BatchLoader(images, labels, shard=(r, 2), **options)) for r in range(2)]
    for b, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([shards[0][b][1], shards[1][b][1]]), y)
        assert torch.equal(torch.cat([shards[0][b][0], shards[1][b][0]]), x)  # the same crops and flips
    with pytest.raises(ValueError, match="shard: got"):
        BatchLoader(images, labels, shard=(2, 2), **options)
    with pytest.raises(ValueError, match="batch_size: got 8 for 3 ranks"):
        BatchLoader(images, labels, shard=(0, 3), **options)


def test_plan_command_lists_each_run_once_with_the_notebooks_that_read_it(capsys):
    cli.main(["plan", "--profile", "smoke", "--dataset", "synthetic", "--json"])
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len({r["key"] for r in runs}) == len(runs) > 8
    readers = {n for r in runs for n in r["notebooks"]}
    trains = {n for n, requests in notebook_requests(SMOKE).items() if requests}
    assert readers == trains and len(trains) >= 7  # every notebook's runs are in the plan
    baseline = next(r for r in runs if r["label"] == "baseline" and r["seed"] == 0
                    and r["model_config"]["width_mult"] == SMOKE.width_mult)
    assert {"01_activation_study", "02_triplet_attention", "04_ablations"} <= set(baseline["notebooks"])
