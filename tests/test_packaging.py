"""The package ships what it needs: every subpackage, the configs, the default model."""

from __future__ import annotations

import re
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


def _requirement_name(line: str) -> str:
    return re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_ci_installs_the_committed_tested_set() -> None:
    """CI pins every dependency (base and every extra CI installs) to a committed version; pyproject keeps ranges."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = re.search(r'-e "\.\[([a-z,]+)\]"', (ROOT / ".ci" / "run").read_text())
    assert installed, ".ci/run should install the project with its extras"
    extras = installed.group(1).split(",")
    assert {"test", "hf"} <= set(extras)
    wanted = [*project["dependencies"], *(r for extra in extras for r in project["optional-dependencies"][extra])]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_requirement_name(name)] = version
    missing = [r for r in wanted if _requirement_name(r) not in pins]
    assert not missing, f"constraints.txt pins nothing for {missing}"
    assert all(">=" in r or "<" in r or "==" not in r for r in wanted), "pyproject should keep ranges, not pins"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-c constraints.txt" in ci
