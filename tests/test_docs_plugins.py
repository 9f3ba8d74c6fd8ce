"""docs/plugins.md cannot rot: its Python blocks run in order, the test functions it shows pass with
the real fixtures, and every hook of decodekit/hookspecs.py is documented there."""

from __future__ import annotations

import inspect
import re
from functools import partial
from pathlib import Path

import pytest

from decodekit import hookspecs
from decodekit.testing import check_processor, check_sampler

PAGE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def hookspec_names() -> list[str]:
    return sorted(
        name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "decodekit_spec")
    )


@pytest.fixture(scope="module")
def namespace() -> dict[str, object]:
    """The page's blocks run one after the other in one namespace (as a reader would run them)."""
    pytest.importorskip("transformers")  # one block shows the transformers interop
    ns: dict[str, object] = {"__name__": "docs_plugins"}
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"docs/plugins.md[block {i}]", "exec"), ns)
        except Exception as exc:  # report which block broke
            raise AssertionError(f"docs/plugins.md block {i} failed: {type(exc).__name__}: {exc}\n{block}") from exc
    return ns


def test_every_python_block_runs(namespace) -> None:
    assert len(python_blocks()) >= 8
    assert {"TopA", "Annealed", "TopAPlugin", "registry"} <= set(namespace)


def test_the_test_functions_shown_pass_with_the_pytest_plugins_fixtures(namespace) -> None:
    fixtures = {
        "decodekit_check_processor": partial(check_processor, max_examples=15),
        "decodekit_check_sampler": partial(check_sampler, max_examples=8),
    }
    shown = {name: fn for name, fn in namespace.items() if name.startswith("test_") and callable(fn)}
    assert set(shown) == {"test_top_a_conforms", "test_annealed_conforms"}
    for fn in shown.values():
        fn(**{arg: fixtures[arg] for arg in inspect.signature(fn).parameters})


def test_the_fixtures_named_on_the_page_are_the_pytest_plugins() -> None:
    from decodekit.testing import pytest_plugin

    text = PAGE.read_text()
    for name in ("decodekit_check_processor", "decodekit_check_sampler"):
        assert name in text and hasattr(pytest_plugin, name)


def test_every_hookspec_is_documented_under_its_own_heading() -> None:
    names = hookspec_names()
    assert names, "no hookspecs found"
    headings = set(re.findall(r"^### `(decodekit_\w+)`$", PAGE.read_text(), flags=re.M))
    missing = [name for name in names if name not in headings]
    assert not missing, f"docs/plugins.md lacks a '### `name`' section for: {missing}"
    unknown = sorted(headings - set(names))
    assert not unknown, f"docs/plugins.md documents hooks that do not exist: {unknown}"


def test_the_entry_point_group_on_the_page_is_decodekits() -> None:
    from decodekit.registry import DISABLE_AUTOLOAD_ENV, ENTRY_POINT_GROUP

    text = PAGE.read_text()
    assert f"[project.entry-points.{ENTRY_POINT_GROUP}]" in text
    assert f"{DISABLE_AUTOLOAD_ENV}=1" in text
