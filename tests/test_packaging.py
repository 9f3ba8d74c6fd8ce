"""The package ships what it needs: every subpackage, the configs, the default model."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "decodekit").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found | {"decodekit.conf"} == listed


def test_configs_are_importable_as_package_data() -> None:
    from importlib.resources import files

    conf = files("decodekit.conf")
    assert conf.joinpath("__init__.py").is_file()
