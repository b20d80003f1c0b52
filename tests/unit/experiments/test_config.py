import json
import re

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from experiments.config import ConfigError, load_config, parse_overrides, prepare_run_dir


def test_dash_and_plain_overrides_give_the_same_config():
    a = load_config("base", ["profile=cpu", "optim.lr=0.1", "data.image_size=64"])
    b = load_config("base", ["--profile=cpu", "--optim.lr=0.1", "--data.image_size=64"])
    assert OmegaConf.to_container(a) == OmegaConf.to_container(b)
    assert a.optim.lr == 0.1 and a.data.image_size == 64


def test_typo_in_override_names_the_key():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*Did you mean optim\.lr"):
        load_config("base", ["profile=cpu", "optim.lrr=0.1"])


def test_wrong_type_fails():
    with pytest.raises(ConfigError, match="data.image_size"):
        load_config("base", ["profile=cpu", "data.image_size=big"])


def test_bad_choice_fails():
    with pytest.raises(ConfigError, match="patch.distance"):
        load_config("base", ["profile=cpu", "patch.distance=hamming"])


def test_not_key_value_fails():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])


def test_profile_overlay_changes_trainer():
    cpu = load_config("base", ["profile=cpu"])
    paper = load_config("base", ["profile=paper"])
    assert cpu.profile == "cpu" and paper.profile == "paper"
    assert cpu.trainer.accelerator == "cpu"
    assert paper.trainer.accelerator == "auto"


def test_auto_profile_is_cpu_without_cuda():
    assert load_config("base", []).profile == "cpu"


def test_cli_wins_over_profile():
    cfg = load_config("base", ["profile=cpu", "trainer.accelerator=gpu"])
    assert cfg.trainer.accelerator == "gpu"


def test_data_selector_loads_data_yaml(tmp_path):
    cfg = load_config("base", ["data=folder", f"data.root={tmp_path}"])
    assert cfg.data.name == "folder" and cfg.data.root == str(tmp_path)


def test_unknown_key_in_struct_config_after_load():
    cfg = load_config("base", [])
    with pytest.raises(ConfigAttributeError):
        cfg.optim.lrr = 1.0


def test_run_dir_records_config_commit_and_time(tmp_path):
    cfg = load_config("base", ["profile=cpu", f"out_dir={tmp_path}/run"])
    out = prepare_run_dir(cfg)
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.profile == "cpu"
    info = json.loads((out / "run_info.json").read_text())
    assert info["git_commit"] and info["timestamp"]


@pytest.mark.parametrize("override, key", [
    ("trainer.max_epochs=-1", "trainer.max_epochs"),  # Lightning: -1 trains forever
    ("data.batch_size=0", "data.batch_size"),
    ("glow.n_bits=0", "glow.n_bits"),  # negative bits/dim otherwise
    ("glow.levels=0", "glow.levels"),
    ("data.image_size=-32", "data.image_size"),
    ("data.volume_size=[8,32]", "data.volume_size"),
    ("patch.locality=[-1]", "patch.locality"),
    ("eval.n_extremes=-5", "eval.n_extremes"),
    ("optim.lr=nan", "optim.lr"),
    ("data.val_fraction=1.5", "data.val_fraction"),
])
def test_out_of_range_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.* is out of range: it must be"):
        load_config(["simclr", "patch"], [override])
