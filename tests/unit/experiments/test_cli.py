"""Entry points: one-line user errors with exit status 2, print_config=true, debug tracebacks."""

import ast
import importlib
import subprocess
import sys

import pytest
import yaml

from experiments import cli, pipeline
from tests.support import REPO_ROOT

ROOT = REPO_ROOT


def test_config_error_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.run(pipeline.main, ["method=patch", "patch.distanse=cosine"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "patch.distanse" in err and "patch.distance" in err
    assert "Traceback" not in err


def test_debug_env_shows_the_traceback(monkeypatch):
    from experiments.config import ConfigError

    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ConfigError, match="patch.distanse"):
        cli.run(pipeline.main, ["method=patch", "patch.distanse=cosine"])


def test_bug_is_not_hidden():
    def main(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run(main, [])


def test_print_config_prints_the_resolved_yaml_and_exits_0(capsys):
    assert cli.run(pipeline.main, ["method=patch", "profile=cpu", "patch.distance=cosine",
                                   "print_config=true"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["patch"]["distance"] == "cosine" and cfg["profile"] == "cpu"
    assert cfg["simclr"]["patch_size"]  # the whole job: SimCLR recipe + detector


def test_module_entry_point_exits_2_in_a_subprocess():
    r = subprocess.run([sys.executable, "-m", "experiments.pipeline", "method=patch",
                        "data.batch_size=0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "data.batch_size" in r.stderr and "Traceback" not in r.stderr


def test_pick_threads_leaves_busy_cores_alone(monkeypatch):
    import os

    monkeypatch.delenv(cli.THREADS_ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert cli.pick_threads() == 2  # idle 2-core machine
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert cli.pick_threads() == 1  # one other CPU-bound job
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 0.0, 0.0))
    assert cli.pick_threads() == 1
    monkeypatch.setenv(cli.THREADS_ENV, "3")
    assert cli.pick_threads() == 3


def test_print_config_of_the_flow_shows_m0_and_m1_as_trained(capsys):
    assert cli.run(pipeline.main, ["method=flow", "config=flow_bct_paper", "profile=paper",
                                   "print_config=true"]) == 0
    m0, m1 = capsys.readouterr().out.split("# --- M1 ---")
    assert "max_epochs: 30" in m0 and "max_epochs: 20" in m1


def test_every_runnable_entry_point_ends_through_cli_entry():
    """A module run with ``python -m`` must end with ``entry(main)``: calling ``main()`` directly
    turns ``print_config=true`` and user errors into tracebacks (train_glow / sample_glow did)."""
    bare = []
    for path in sorted((REPO_ROOT / "experiments").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if not (isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)):
                continue
            calls = [ast.unparse(n) for n in ast.walk(node) if isinstance(n, ast.Call)]
            if not any(c.startswith("entry(") for c in calls):
                bare.append(path.name)
    assert not bare, f"these entry points bypass experiments.cli.entry: {bare}"


@pytest.mark.parametrize("module", ["train_glow", "sample_glow"])
def test_glow_entry_points_print_config_and_exit_0(module, capsys):
    """In process: the guard above makes ``python -m`` reach the same ``cli.run``."""
    main = importlib.import_module(f"experiments.{module}").main
    assert cli.run(main, ["print_config=true"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "glow:" in out


def test_demo_and_detect_image_print_config_and_exit_0(capsys, tmp_path):
    from experiments import demo, detect_image

    assert cli.run(demo.main, [f"out_dir={tmp_path}", "patch.distance=cosine",
                               "print_config=true"]) == 0
    out = capsys.readouterr().out
    parts = {p.split(" ===\n", 1)[0]: p.split(" ===\n", 1)[1] for p in out.split("# === ")[1:]}
    assert list(parts) == ["patch", "flow_cxr", "flow_bct"]
    patch = yaml.safe_load(parts["patch"])
    assert patch["patch"]["distance"] == "cosine" and patch["out_dir"] == str(tmp_path / "patch")
    assert "modality: bct" in parts["flow_bct"] and "# --- M1 ---" in parts["flow_bct"]
    assert cli.run(demo.main, [f"out_dir={tmp_path}", "print_config=false",
                               "data.batch_size=0"]) == 2  # false: a run (here a config error)
    capsys.readouterr()
    assert cli.run(detect_image.main, ["a.png", f"run_dir={tmp_path}", "threshold=0.7",
                                       "print_config=true"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg == {"images": ["a.png"], "run_dir": str(tmp_path), "device": "auto",
                   "threshold": 0.7, "out": str(tmp_path / "detections")}


def test_entry_destroys_a_process_group_the_run_left(monkeypatch, tmp_path):
    import torch.distributed as dist

    monkeypatch.setattr(cli, "configure_threads", lambda: 1)  # this process keeps its threads
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)  # a file store: no port to collide on
    with pytest.raises(SystemExit) as stop:
        cli.entry(lambda argv: None)
    assert stop.value.code == 0 and not dist.is_initialized()
    cli.end_distributed()  # nothing left: a no-op
