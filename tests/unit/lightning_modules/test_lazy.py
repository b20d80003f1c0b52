"""Lazy package exports: loading a configuration does not import torch; every name resolves."""

import subprocess
import sys

import pytest

from lightning_modules.lazy import lazy_exports


def test_config_loading_does_not_import_torch():
    code = ("import sys, lightning_modules.glow, lightning_modules.simclr, experiments.config; "
            "print(sorted(m for m in ('torch', 'lightly', 'normflows') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("package", ["lightning_modules.glow", "lightning_modules.simclr"])
def test_every_export_resolves(package):
    import importlib

    pkg = importlib.import_module(package)
    for name in pkg.__all__:
        obj = getattr(pkg, name)
        assert obj.__name__ == name and obj.__module__.startswith(package + ".")


def test_unknown_name_is_an_attribute_error():
    getattr_, all_ = lazy_exports("pkg", {"json": ["dumps", "loads"]})
    assert all_ == ["dumps", "loads"] and getattr_("dumps")({"a": 1}) == '{"a": 1}'
    with pytest.raises(AttributeError, match="'pkg' has no attribute 'nope'"):
        getattr_("nope")
