"""W&B logging: offline by default, files under the output folder, opt-in online."""

from pathlib import Path

import pytest

from experiments.common import make_logger, wandb_mode
from experiments.config import load_config


def test_logger_none_disables_wandb(out_dir):
    cfg = load_config("base", ["profile=cpu", "logger=none"])
    assert make_logger(cfg, out_dir) is None


@pytest.mark.parametrize(
    ("cli", "env", "expected"),
    [
        ([], None, "offline"),
        ([], "offline", "offline"),
        (["logger.mode=online"], None, "online"),
        ([], "online", "online"),
        (["logger.mode=disabled"], "online", "disabled"),
    ],
)
def test_wandb_mode_is_offline_unless_opted_in(monkeypatch, cli, env, expected):
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    cfg = load_config("base", ["profile=cpu", *cli])
    assert wandb_mode(cfg) == expected


def test_offline_run_writes_under_out_dir_and_sends_nothing(out_dir, monkeypatch):
    # An unreachable server: an offline run must finish without ever needing it.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    cfg = load_config("base", ["profile=cpu", f"out_dir={out_dir}"])
    logger = make_logger(cfg, out_dir)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    run = logger.experiment
    assert run.settings.mode == "offline"
    run.finish()
    runs = list((Path(out_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(Path(out_dir).rglob("*"))
    assert list(runs[0].glob("*.wandb")), "the offline run's data file is missing"
