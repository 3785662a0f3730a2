"""Resumable grids: finished runs are found by run name; mk/tables.mk refuses what cannot run."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tsft import paths
from tsft.report.grid import finished_result, result_exists
from tsft.report.tables import GLUE_TASKS

from .helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
MK = ROOT / "mk" / "tables.mk"


def cfg_for(results_dir, run_name="ts-lora-minilm-l6-lam1e-05-seed1-cpu"):
    return OmegaConf.create(
        {"run_name": run_name, "task": {"name": "glue/rte"}, "paths": {"results_dir": str(results_dir)}}
    )


def test_finished_run_is_found_through_the_pipelines_run_dir_naming(tmp_path):
    cfg = cfg_for(tmp_path)
    assert not result_exists(cfg)
    run_dir = paths.create_run_dir(paths.task_runs_dir(cfg.paths, cfg.task.name), cfg.run_name)
    assert not result_exists(cfg)  # started but not finished (a crash leaves no result.json)
    (run_dir / paths.RESULT_FILENAME).write_text("{}")
    assert finished_result(cfg) == run_dir / paths.RESULT_FILENAME


def test_other_runs_sharing_a_prefix_do_not_count(tmp_path):
    cfg = cfg_for(tmp_path, run_name="lora-minilm-l6-seed1-cpu")
    task_dir = paths.task_runs_dir(cfg.paths, cfg.task.name)
    for name in ("lora-minilm-l6-seed10-cpu-20250101-120000", "lora-minilm-l6-seed1-cpu-extra-20250101-120000"):
        (task_dir / name).mkdir(parents=True)
        (task_dir / name / paths.RESULT_FILENAME).write_text("{}")
    assert not result_exists(cfg)
    clash = task_dir / "lora-minilm-l6-seed1-cpu-20250101-120000-0a1f"  # create_run_dir's suffix on a clash
    clash.mkdir()
    (clash / paths.RESULT_FILENAME).write_text("{}")
    assert result_exists(cfg)


def test_without_a_run_name_nothing_is_skipped(tmp_path):
    assert not result_exists(cfg_for(tmp_path, run_name=None))


def test_cpu_task_list_in_makefile_matches_aggregator():
    line = next(line for line in MK.read_text().splitlines() if line.startswith("CPU_GLUE_TASKS"))
    assert line.split(":=")[1].split() == GLUE_TASKS["cpu"]
    line = next(line for line in MK.read_text().splitlines() if line.startswith("PAPER_GLUE_TASKS"))
    assert line.split(":=")[1].split() == GLUE_TASKS["paper"]


def make(tmp_path, *args):
    (tmp_path / "Makefile").write_text(f"PYTHON := {sys.executable}\ninclude {MK}\n")
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(tmp_path), *args], capture_output=True, text=True, timeout=60
    )


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


@needs_make
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine would start the paper grid")
@pytest.mark.parametrize("target", ["table3", "table1"])
def test_paper_grid_refuses_without_gpu(tmp_path, target):
    done = make(tmp_path, target)
    assert done.returncode != 0
    assert f"make {target} PRESET=cpu" in done.stderr


@needs_make
def test_unknown_preset_is_refused(tmp_path):
    done = make(tmp_path, "table3", "PRESET=big")
    assert done.returncode != 0 and "PRESET must be cpu or paper" in done.stderr


@needs_make
def test_cpu_grid_command(tmp_path):
    done = make(tmp_path, "-n", "table3", "PRESET=cpu", "JOBS=2")
    command = next(line for line in done.stdout.splitlines() if "scripts/run_grid.py" in line)
    assert "--jobs 2" in command
    experiments = re.search(r"--deal 'experiment=([^']+)'", command).group(1).split(",")
    assert experiments == [
        f"table3_cpu_{m}" for m in ("lora", "ts_lora", "adalora", "ts_adalora", "adapter", "ts_adapter")
    ]
    assert re.search(r"'task=([^']+)'", command).group(1).split(",") == [f"glue/{t}" for t in GLUE_TASKS["cpu"]]
    assert "'seed=1,2,3'" in command and "++skip_existing=true" in command  # three seeds: paired intervals
    assert "aggregate-$table PRESET=cpu" in command
    for name in experiments:  # every swept experiment exists
        assert (ROOT / "configs" / "experiment" / f"{name}.yaml").is_file()


def test_run_grid_deals_experiments_round_robin_without_empty_jobs():
    run_grid = load_script("run_grid")
    assert run_grid.deal(["a", "b", "c", "d", "e", "f"], 2) == [["a", "c", "e"], ["b", "d", "f"]]
    assert run_grid.deal(["a", "b"], 3) == [["a"], ["b"]]


def test_run_grid_jobs_each_run_their_share_and_report_the_first_failure(tmp_path, monkeypatch):
    """Two jobs side by side, one thread each, separate Hydra sweep directories; a failing job's status wins."""
    run_grid = load_script("run_grid")
    launched = []

    class FakeProcess:
        def __init__(self, command, cwd, env, stdout, stderr):
            launched.append((command, env["OMP_NUM_THREADS"]))
            self.status = 3 if "experiment=b" in command else 0

        def wait(self):
            return self.status

    monkeypatch.setattr(run_grid.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(run_grid.os, "cpu_count", lambda: 2)
    status = run_grid.main(["--jobs", "2", "--deal", "experiment=a,b", "--log-dir", str(tmp_path), "--", "seed=1,2"])
    assert status == 3
    assert [(c[3], threads) for c, threads in launched] == [("experiment=a", "1"), ("experiment=b", "1")]
    sweep_dirs = [next(arg for arg in c if arg.startswith("hydra.sweep.dir=")) for c, _ in launched]
    assert len(set(sweep_dirs)) == 2 and all("seed=1,2" in c for c, _ in launched)


def test_a_finished_run_of_other_settings_is_refused_not_reused(tmp_path):
    """The same run name after a preset change (another lr): reusing the old result would put the old preset's
    number into the new table. Where files live or how a run reports does not count as another setting."""
    import json

    from tsft.errors import InputError

    cfg = cfg_for(tmp_path)
    cfg.task.lr = 1e-3
    run_dir = paths.create_run_dir(paths.task_runs_dir(cfg.paths, cfg.task.name), cfg.run_name)
    (run_dir / paths.RESULT_FILENAME).write_text(json.dumps({"config": OmegaConf.to_container(cfg)}))
    moved = OmegaConf.merge(cfg, {"paths": {"data_dir": "/elsewhere"}, "skip_existing": True, "study": "table3"})
    moved.paths.results_dir = cfg.paths.results_dir
    moved.task.new_key = 1  # a setting the finished run's version did not record
    assert finished_result(moved) == run_dir / paths.RESULT_FILENAME
    cfg.task.lr = 2e-3
    with pytest.raises(InputError, match=r"task.lr was 0.001, now 0.002"):
        finished_result(cfg)


@needs_make
def test_calibration_sweep_command(tmp_path):
    done = make(tmp_path, "-n", "table3-calibrate", "PRESET=cpu", "JOBS=2")
    command = next(line for line in done.stdout.splitlines() if "scripts/run_grid.py" in line)
    experiments = re.search(r"--deal 'experiment=([^']+)'", command).group(1).split(",")
    assert experiments == [f"table3_cpu_{m}" for m in ("ts_lora", "ts_adalora", "ts_adapter")]
    assert "'sparsity.s=3e-4,1e-3'" in command and "'seed=1'" in command and "++skip_existing=true" in command
    assert "grid-logs/table3-calibrate-cpu" in command  # its own logs: the main grid's stay


def test_an_s_sweep_gets_run_names_of_its_own_and_the_grids_names_stay():
    from .helpers import compose_config

    names = {
        s: compose_config(["experiment=table3_cpu_ts_lora", "task=glue/sst2", *([f"sparsity.s={s}"] if s else [])])[
            "run_name"
        ]
        for s in (None, "1e-4", "3e-4", "1e-3")
    }
    assert names[None] == names["1e-4"] == "ts-lora-minilm-l6-lam2e-05-seed1-cpu"  # the finished grid's names
    assert (names["3e-4"], names["1e-3"]) == (f"{names[None]}-s3e-4", f"{names[None]}-s1e-3")
