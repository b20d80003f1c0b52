"""Sweeps (fast tier): sweep files against our schema, the agent's command lines, the offline
grid/random runner with a stand-in entry point (tests/stubs/sweep_stub.py), and the grid runner the
offline sweeps share with the ablations (experiments/grid.py)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from experiments.config import REPO_ROOT, load_config
from experiments.sweep import (
    ENTRY_POINT_METRICS,
    SweepError,
    agent_command,
    command_entry_point,
    config_for_command,
    flat_parameters,
    load_sweep,
    server_config,
    validate_sweep,
    with_overrides,
)
from experiments.sweep_offline import (
    grid_points,
    plan_trials,
    random_points,
    run_sweep,
    sample_value,
)

SWEEP_FILES = sorted((REPO_ROOT / "configs" / "sweeps").glob("*.yaml"))
STUB = str(REPO_ROOT / "tests" / "stubs" / "sweep_stub.py")


def _sweep(**kw) -> dict:
    base = {
        "method": "grid",
        "metric": {"name": "val/bpd", "goal": "minimize"},
        "parameters": {"optim.lr": {"values": [0.001]}},
        "command": ["${env}", "python", "-m", "experiments.train_glow", "${args_no_hyphens}"],
    }
    base.update(kw)
    return base


# --------------------------------------------------------------------------- sweep files


def test_required_sweeps_exist():
    entry = {}
    for f in SWEEP_FILES:
        s = yaml.safe_load(f.read_text())
        entry[command_entry_point(s["command"])] = s
    assert {"experiments.train_simclr", "experiments.train_glow", "experiments.pipeline"} <= set(
        entry
    )
    assert set(flat_parameters(entry["experiments.train_simclr"])) == {
        "optim.lr", "simclr.temperature", "simclr.crop_scale"}
    assert set(flat_parameters(entry["experiments.train_glow"])) == {
        "optim.lr", "glow.hidden_channels", "glow.steps"}
    assert {"patch.distance", "patch.weights"} <= set(
        flat_parameters(entry["experiments.pipeline"]))
    assert entry["experiments.pipeline"]["metric"]["name"] == "val/auroc"
    assert entry["experiments.train_glow"]["metric"] == {"name": "val/bpd", "goal": "minimize"}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_file_validates(path):
    sweep = load_sweep(path)  # raises SweepError listing every problem
    module = command_entry_point(sweep["command"])
    assert sweep["metric"]["name"] in ENTRY_POINT_METRICS[module]
    assert any("out_dir=" in str(c) for c in sweep["command"]), "each run needs its own out_dir"
    assert sweep.get("program"), "W&B requires program:"


def _agent_values(sweep: dict, n: int = 5) -> list[dict]:
    """A few trials: evenly spaced grid points (first and last included) or random draws
    (every value's type is checked by load_sweep already)."""
    if sweep["method"] == "grid":
        pts = plan_trials(sweep, None)
        return [pts[int(i)] for i in np.unique(np.linspace(0, len(pts) - 1, n).round())]
    return random_points(flat_parameters(sweep), n, seed=1)


def _json_roundtrip(params: dict) -> dict:
    """The server is written in Go, whose JSON writes 1.0 as 1: the agent may get ints."""
    def whole(v):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, list):
            return [whole(x) for x in v]
        return v
    return {k: whole(v) for k, v in json.loads(json.dumps(params)).items()}


@pytest.mark.parametrize("macro", ["${args_no_hyphens}", "${args}"])
@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_agent_command_parses_into_config(path, macro, monkeypatch):
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    sweep = load_sweep(path)
    command = [macro if c in ("${args}", "${args_no_hyphens}") else c for c in sweep["command"]]
    for params in _agent_values(sweep):
        for sent in (params, _json_roundtrip(params)):
            argv = agent_command(command, sent, program=sweep["program"])
            assert argv[:2] == ["/usr/bin/env", "python"]
            cfg = config_for_command(argv)
            for key, value in params.items():
                got = OmegaConf.select(cfg, key)
                got = OmegaConf.to_object(got) if OmegaConf.is_config(got) else got
                assert got == pytest.approx(value), (key, argv)
            name = Path(cfg.out_dir).parent.name
            assert cfg.out_dir == f"outputs/sweeps/{name}/abc123"


def test_agent_formatting_is_wandbs():
    """What the agent puts on the command line (wandb 0.31 create_sweep_command_args)."""
    command = ["${env}", "${interpreter}", "-m", "x", "a=${envvar:SWEEP_TEST_VAR}", "${args}"]
    os.environ["SWEEP_TEST_VAR"] = "7"
    try:
        argv = agent_command(command, {"optim.lr": 1e-05, "trainer.deterministic": True,
                                       "patch.weights": [0.1, 1.2, 1.2, 1.0],
                                       "patch.distance": "cosine"})
    finally:
        del os.environ["SWEEP_TEST_VAR"]
    assert argv == ["/usr/bin/env", "python", "-m", "x", "a=7", "--optim.lr=1e-05",
                    "--trainer.deterministic=True", "--patch.weights=[0.1, 1.2, 1.2, 1.0]",
                    "--patch.distance=cosine"]
    no_hyphens = agent_command(["${args_no_hyphens}"], {"glow.steps": 4})
    assert no_hyphens == ["glow.steps=4"]
    cfg = load_config("base", argv[5:])
    assert cfg.optim.lr == 1e-05 and cfg.trainer.deterministic is True
    assert list(cfg.patch.weights) == [0.1, 1.2, 1.2, 1.0] and cfg.patch.distance == "cosine"


@pytest.mark.parametrize("change, message", [
    ({"parameters": {"optim.lrr": {"values": [0.1]}}}, "not a config key"),
    ({"method": "random", "parameters": {"optim.lrr": {"distribution": "log_uniform", "min": -4.0,
                                                       "max": 0.0}}}, "not a config key"),
    ({"parameters": {"glow.steps": {"values": [2.5]}}}, "glow.steps: value 2.5"),
    ({"method": "random", "parameters": {"glow.steps": {"distribution": "q_uniform", "min": 2,
                                                        "max": 8}}}, "glow.steps: value 2.0"),
    ({"method": "random", "parameters": {"glow.steps": {"distribution": "uniform", "min": 2,
                                                        "max": 8}}}, "glow.steps: value 2.0"),
    ({"parameters": {"patch.distance": {"values": ["chebyshev"]}}}, "not one of"),
    ({"parameters": {"simclr.input_size": {"values": [None]}}}, "text 'None'"),
    ({"parameters": {"optim": {"parameters": {"lr": {"values": [0.1]}}}}}, "dotted names"),
    ({"parameters": {"optim.lr": {"min": 0.1, "max": 0.01}}}, "min 0.1 > max 0.01"),
    ({"method": "random", "parameters": {"optim.lr": yaml.safe_load("{min: 1e-4, max: 0.1}")}},
     "YAML reads 1e-4 as text"),
    ({"parameters": {"optim.lr": {"distribution": "log_uniform_values", "min": 1e-4,
                                  "max": 1e-2}}}, "cannot be used with method: grid"),
    ({"metric": {"name": "test/auroc", "goal": "maximize"}}, "never the test set"),
    ({"metric": {"name": "val/auroc", "goal": "maximize"}}, "not written by"),
    ({"metric": {"name": "val/bpd", "goal": "lower"}}, "goal"),
    ({"method": "hyperband"}, "method"),
    ({"command": ["python", "-m", "experiments.train_glow", "${args_json}"]}, "args_json"),
    ({"command": ["python", "-m", "experiments.train_glow", "optim.lr=0.1", "${args}"]},
     "also set in command"),
])
def test_validate_sweep_names_the_problem(change, message):
    with pytest.raises(SweepError, match="invalid sweep file") as err:
        validate_sweep(_sweep(**change), "bad.yaml")
    assert message in str(err.value)
    assert "bad.yaml" in str(err.value)


def test_missing_sweep_file_lists_available(tmp_path):
    with pytest.raises(SweepError, match="does not exist. Available"):
        load_sweep(tmp_path / "nope.yaml")


def test_server_config_places_overrides_and_run_dir(monkeypatch):
    sweep = _sweep()
    cfg = server_config(sweep, "mine", ["data=folder", "logger.project=p"])
    assert cfg["command"][-1] == "${args_no_hyphens}"
    assert cfg["command"][-4:-1] == [
        "data=folder", "logger.project=p", "out_dir=outputs/sweeps/mine/${oc.env:WANDB_RUN_ID,local}"]
    assert sweep["command"][-2] == "experiments.train_glow"  # the loaded file is left as is
    monkeypatch.setenv("WANDB_RUN_ID", "r42")
    conf = load_config("base", agent_command(cfg["command"], {"optim.lr": 0.5})[4:])
    assert conf.out_dir == "outputs/sweeps/mine/r42" and conf.optim.lr == 0.5
    # a command that already sets out_dir keeps it
    own = server_config(_sweep(command=["python", "-m", "m", "out_dir=X", "${args}"]), "m", [])
    assert [c for c in own["command"] if "out_dir" in c] == ["out_dir=X"]
    assert with_overrides(["a", "out_dir=X", "${args}"], ["k=v"], out_dir="Y") == [
        "a", "k=v", "out_dir=Y", "${args}"]


# --------------------------------------------------------------------------- sampling


def test_grid_is_wandbs_order_and_size():
    params = {"b": {"values": [1, 2, 3]}, "a": {"values": ["x", "y"]}, "c": {"value": 0.5}}
    pts = grid_points(params)
    assert len(pts) == 6
    # sorted names, the first ("a") varying slowest
    assert [(p["a"], p["b"]) for p in pts] == [("x", 1), ("x", 2), ("x", 3),
                                               ("y", 1), ("y", 2), ("y", 3)]
    assert all(p["c"] == 0.5 for p in pts)
    assert grid_points({"k": {"min": 2, "max": 4}}) == [{"k": 2}, {"k": 3}, {"k": 4}]
    q = grid_points({"k": {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25}})
    assert [p["k"] for p in q] == [0.0, 0.25, 0.5, 0.75]  # max excluded, as W&B's arange
    assert len(grid_points({"k": {"values": [1, 1, 2]}})) == 2


def test_grid_count_caps_and_random_needs_count():
    sweep = _sweep(parameters={"optim.lr": {"values": [0.1, 0.2, 0.3]}})
    assert len(plan_trials(sweep, None)) == 3
    assert len(plan_trials(sweep, 2)) == 2
    rnd = _sweep(method="random", parameters={"optim.lr": {"min": 0.1, "max": 0.2}})
    with pytest.raises(SweepError, match="COUNT"):
        plan_trials(rnd, None)
    assert len(plan_trials(dict(rnd, run_cap=3), None)) == 3
    with pytest.raises(SweepError, match="bayes needs the W&B server"):
        plan_trials(dict(rnd, method="bayes"), 3)


def test_random_is_seeded_and_in_range():
    params = {
        "optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1.0},
        "glow.steps": {"min": 2, "max": 5},
        "simclr.temperature": {"min": 0.1, "max": 0.2},
        "patch.distance": {"values": ["cosine", "euclidean"]},
    }
    a, b = random_points(params, 50, seed=3), random_points(params, 50, seed=3)
    assert a == b
    assert a != random_points(params, 50, seed=4)
    assert all(1e-4 <= p["optim.lr"] <= 1.0 and type(p["optim.lr"]) is float for p in a)
    assert {p["glow.steps"] for p in a} == {2, 3, 4, 5}  # int_uniform: both ends included
    assert all(type(p["glow.steps"]) is int for p in a)
    assert all(0.1 <= p["simclr.temperature"] <= 0.2 for p in a)


def test_distributions_have_the_right_shape():
    rng = np.random.default_rng(0)
    n = 4000
    # log_uniform_values: log10 uniform on [-4, 0] -> a quarter of the draws below 1e-3
    lr = np.array([sample_value({"distribution": "log_uniform_values", "min": 1e-4, "max": 1.0},
                                rng) for _ in range(n)])
    assert np.mean(lr < 1e-3) == pytest.approx(0.25, abs=0.03)
    assert np.mean(np.log10(lr)) == pytest.approx(-2.0, abs=0.06)
    # log_uniform (W&B v1): min/max are natural-log exponents
    v1 = np.array([sample_value({"distribution": "log_uniform", "min": -2.0, "max": 0.0}, rng)
                   for _ in range(n)])
    assert v1.min() >= math.exp(-2) and v1.max() <= 1.0
    assert np.mean(np.log(v1)) == pytest.approx(-1.0, abs=0.05)
    # uniform: mean in the middle, a quarter below the first quartile
    u = np.array([sample_value({"min": 0.0, "max": 4.0}, rng) for _ in range(n)])
    assert np.mean(u < 1.0) == pytest.approx(0.25, abs=0.03)
    # q_uniform: multiples of q, int when q is an int
    q = [sample_value({"distribution": "q_uniform", "min": 0, "max": 10, "q": 2}, rng)
         for _ in range(200)]
    assert set(q) <= {0, 2, 4, 6, 8, 10} and all(type(x) is int for x in q)
    # categorical with probabilities
    c = [sample_value({"values": ["a", "b"], "probabilities": [0.8, 0.2]}, rng) for _ in range(n)]
    assert c.count("a") / n == pytest.approx(0.8, abs=0.03)
    with pytest.raises(SweepError, match="not supported offline"):
        sample_value({"distribution": "normal"}, rng)


# --------------------------------------------------------------------------- offline runner


def _write_stub_sweep(tmp_path: Path, macro: str = "${args_no_hyphens}", **kw) -> Path:
    sweep = {
        "name": "stub",
        "program": "tests/stubs/sweep_stub.py",
        "method": "grid",
        "metric": {"name": "val/bpd", "goal": "minimize"},
        "parameters": {"optim.lr": {"values": [0.1, 0.001]}, "glow.steps": {"values": [2, 4]}},
        "command": ["${env}", "python", STUB, "profile=cpu", "logger=none", macro],
    }
    sweep.update(kw)
    path = tmp_path / "stub.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def _stub_metric(lr, steps):
    return (math.log10(lr) + 3.0) ** 2 + 0.1 * steps


def test_offline_grid_sweep_summary(tmp_path):
    root = tmp_path / "sweeps"
    rows = run_sweep(_write_stub_sweep(tmp_path), root=root)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    values = [r["val/bpd"] for r in rows]
    assert values == sorted(values)  # minimize: best first
    for r in rows:  # each metric is the trial's own, read from its metrics.json
        assert r["val/bpd"] == pytest.approx(_stub_metric(float(r["optim.lr"]),
                                                          int(r["glow.steps"])))
    assert (rows[0]["optim.lr"], rows[0]["glow.steps"]) == ("0.001", "2")
    # every trial is its own run in its own folder, W&B offline, values as the agent passes them
    trial_dirs = sorted((root / "stub").glob("t*"))
    assert [d.name for d in trial_dirs] == ["t000", "t001", "t002", "t003"]
    for d in trial_dirs:
        m = json.loads((d / "metrics.json").read_text())
        assert m["wandb_mode"] == "offline"
        assert f"out_dir={d}" in m["argv"]
        conf = OmegaConf.load(d / "config.yaml")
        assert conf.out_dir == str(d)
        record = json.loads((d / "sweep_trial.json").read_text())
        assert f"optim.lr={record['params']['optim.lr']}" in m["argv"]
    with open(root / "stub" / "summary.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 4
    assert [float(t["val/bpd"]) for t in table] == pytest.approx(values)
    md = (root / "stub" / "summary.md").read_text().splitlines()
    assert md[2].startswith("| rank | trial | glow.steps | optim.lr | val/bpd")
    assert len([line for line in md if line.startswith("| ") and "t00" in line]) == 4


def test_offline_sweep_maximize_with_hyphens_failures_and_resume(tmp_path, caplog):
    root = tmp_path / "sweeps"
    path = _write_stub_sweep(
        tmp_path, macro="${args}",
        metric={"name": "val/bpd", "goal": "maximize"},
        parameters={"optim.lr": {"values": [0.001, 0.5, 0.1]}},  # the stub fails for 0.5
    )
    rows = run_sweep(path, root=root)
    assert [r["trial"] for r in rows] == ["t002", "t000", "t001"]  # maximize: best first
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert rows[0]["val/bpd"] > rows[1]["val/bpd"] and math.isnan(rows[2]["val/bpd"])
    assert "--optim.lr=0.5" in (root / "stub" / "t001" / "trial.log").read_text()
    assert "fails on purpose" in (root / "stub" / "t001" / "trial.log").read_text()
    # a second call reuses the finished trials and re-runs the failed one
    log_mtime = (root / "stub" / "t000" / "trial.log").stat().st_mtime_ns
    caplog.set_level("INFO")
    again = run_sweep(path, root=root)
    assert [r["trial"] for r in again] == [r["trial"] for r in rows]
    assert (root / "stub" / "t000" / "trial.log").stat().st_mtime_ns == log_mtime
    assert "done before" in caplog.text


def test_offline_random_count_and_overrides(tmp_path):
    path = _write_stub_sweep(
        tmp_path, method="random",
        parameters={"optim.lr": {"distribution": "log_uniform_values", "min": 1e-4,
                                 "max": 1e-2}, "glow.steps": {"min": 1, "max": 3}},
    )
    rows = run_sweep(path, count=2, seed=5, overrides=["data.batch_size=3"], root=tmp_path / "s")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    conf = OmegaConf.load(Path(rows[0]["out_dir"]) / "config.yaml")
    assert conf.data.batch_size == 3
    with pytest.raises(SweepError, match="swept"):
        run_sweep(path, count=1, overrides=["optim.lr=0.1"], root=tmp_path / "s")
    with pytest.raises(SweepError, match="out_dir is set per trial"):
        run_sweep(path, count=1, overrides=["out_dir=x"], root=tmp_path / "s")


def test_offline_cli_refuses_bayes_clearly(tmp_path, caplog):
    from experiments.sweep_offline import main

    path = _write_stub_sweep(tmp_path, method="bayes")
    with pytest.raises(SystemExit) as exit_:
        main([str(path), "--count", "2", "--root", str(tmp_path / "s")])
    assert exit_.value.code == 2
    assert "bayes needs the W&B server" in caplog.text


# --------------------------------------------------------------------------- online checks


def _run_online_cli(tmp_path, env_changes: dict, timeout=120):
    env = {k: v for k, v in os.environ.items()
           if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL")}
    env.update({"HOME": str(tmp_path), "NETRC": str(tmp_path / "netrc"),
                "WANDB_CONFIG_DIR": str(tmp_path / "wandbcfg"), "PYTHONPATH": str(REPO_ROOT)})
    env.update(env_changes)
    return subprocess.run(
        [sys.executable, "-m", "experiments.sweep", "configs/sweeps/glow_cxr.yaml",
         "--count", "1"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=timeout,
    )


def test_online_sweep_refuses_offline_mode(monkeypatch, caplog):
    from experiments.sweep import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(SystemExit) as exit_:
        main(["configs/sweeps/glow_cxr.yaml", "--count", "1"])
    assert exit_.value.code == 2
    assert "WANDB_MODE=offline" in caplog.text and "make sweep-offline" in caplog.text


def test_online_sweep_without_credentials_says_so(tmp_path):
    proc = _run_online_cli(tmp_path, {})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "No W&B credentials" in out and "make sweep-offline" in out


def test_online_sweep_creates_sweep_and_agent(monkeypatch, tmp_path):
    """The W&B calls themselves are replaced (no server here): what we send and start."""
    import wandb

    import experiments.sweep as sweep_mod

    calls = {}
    monkeypatch.setenv("WANDB_MODE", "online")  # restored after the test
    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setattr(sweep_mod, "check_wandb_access", lambda path: None)
    monkeypatch.setattr(wandb, "sweep", lambda cfg, entity, project: calls.update(
        cfg=cfg, entity=entity, project=project) or "sw123")
    monkeypatch.setattr(wandb, "agent", lambda sweep_id, entity, project, count: calls.update(
        agent=(sweep_id, entity, project, count)))
    sid = sweep_mod.main(["configs/sweeps/glow_cxr.yaml", "--count", "2", "--project", "p1",
                          "data.batch_size=2"])
    assert sid == "sw123"
    assert calls["project"] == "p1" and calls["agent"] == ("sw123", None, "p1", 2)
    cmd = calls["cfg"]["command"]
    assert cmd[-1] == "${args_no_hyphens}"
    assert "data.batch_size=2" in cmd and "logger.project=p1" in cmd
    assert os.environ["WANDB_MODE"] == "online"  # the agent's runs log online
    monkeypatch.setenv("WANDB_RUN_ID", "run9")
    conf = config_for_command(agent_command(cmd, {"optim.lr": 0.001, "glow.steps": 8,
                                                  "glow.hidden_channels": 128}))
    assert conf.logger.project == "p1" and conf.data.batch_size == 2
    assert conf.out_dir == "outputs/sweeps/glow_cxr/run9"
    with pytest.raises(SystemExit):
        sweep_mod.main(["configs/sweeps/glow_cxr.yaml", "logger=none"])
    with pytest.raises(SystemExit):
        sweep_mod.main(["configs/sweeps/glow_cxr.yaml", "optim.lr=0.1"])  # swept key


# --------------------------------------------------------------------------- the grid runner


def test_cartesian_is_first_axis_slowest_and_drops_repeats():
    from experiments.grid import cartesian

    assert cartesian({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    assert cartesian({"w": [[1, 2], [1, 2], [3]]}) == [{"w": [1, 2]}, {"w": [3]}]


def test_run_grid_keeps_failed_runs_as_rows_and_counts_them(caplog):
    from experiments.grid import run_grid

    def run(i, point):
        if point["x"] == 2:
            raise RuntimeError("broken on purpose")
        return {"x": point["x"], "y": 10 * point["x"]}

    points = [{"x": x} for x in (1, 2, 3, 4)]
    rows = run_grid(points, run, "test grid", label=lambda p: {"x": f"<{p['x']}>"},
                    stop=lambda row: row.get("y") == 30, progress=False)
    assert rows[0] == {"x": 1, "y": 10} and rows[2] == {"x": 3, "y": 30}
    assert rows[1] == {"x": "<2>", "status": "failed", "error": "RuntimeError: broken on purpose"}
    assert len(rows) == 3  # stopped after x = 3
    assert "1 of 3 run(s) failed" in caplog.text


def test_write_table_has_every_column_and_a_markdown_table(tmp_path, capsys):
    from experiments.grid import write_table

    rows = [{"v": "a", "auroc": 0.81234, "out_dir": "/x"},
            {"v": "b|c", "status": "failed", "error": "boom"}]
    csv_path, md_path = write_table(rows, tmp_path / "t", "Title", "A note.", fmt=".3f")
    with open(csv_path) as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["v", "auroc", "out_dir", "status", "error"]
    assert table[1]["auroc"] == "" and table[1]["error"] == "boom"
    md = md_path.read_text().splitlines()
    assert md[:5] == ["# Title", "", "A note.", "", "| v | auroc | status | error |"]
    assert md[6] == "| a | 0.812 |  |  |" and md[7] == "| b\\|c |  | failed | boom |"
    assert "| a | 0.812 |" in capsys.readouterr().out


def test_ablation_file_refuses_a_mistyped_distance(tmp_path):
    from experiments.ablations import load_spec
    from experiments.config import ConfigError

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"grid": {"sizes": "each", "distance": ["manhatan"]}}))
    with pytest.raises(ConfigError, match="grid.distance: 'manhatan'.*not one of"):
        load_spec(path)
    for name in ("table2", "table3", "distances"):
        assert load_spec(REPO_ROOT / "configs" / "ablations" / f"{name}.yaml")["name"] == name
