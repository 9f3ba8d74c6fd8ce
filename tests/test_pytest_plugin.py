"""The pytest plugin decodekit installs (entry point ``pytest11``) loads in any project's pytest,
also where Hypothesis is not installed; only its fixtures need Hypothesis, and they say so."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Run pytest in a fresh interpreter where importing hypothesis fails, as it does where it is not
# installed: a meta-path finder refuses it, and Hypothesis's own pytest plugin (which would not
# be installed either) is not loaded.
WITHOUT_HYPOTHESIS = textwrap.dedent(
    """
    import sys

    class NoHypothesis:
        def find_spec(self, name, path=None, target=None):
            if name == "hypothesis" or name.startswith("hypothesis."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoHypothesis())
    import pytest
    sys.exit(pytest.main(["-p", "no:hypothesispytest", "-p", "no:cacheprovider", *sys.argv[1:]]))
    """
)

PROJECT_TESTS = '''
def test_unrelated():
    assert 1 + 1 == 2


def test_hypothesis_cannot_be_imported():
    import pytest

    with pytest.raises(ModuleNotFoundError):
        import hypothesis  # noqa: F401


def test_uses_the_fixture(decodekit_check_processor):
    raise AssertionError("not reached: the fixture fails first")
'''


def run_pytest(folder: Path, *args: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "HYPOTHESIS"))}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_HYPOTHESIS, *args], cwd=folder, env=environ,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_plugin_loads_without_hypothesis_and_its_fixtures_say_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # another project: its own root, none of our settings
    (tmp_path / "test_project.py").write_text(PROJECT_TESTS)
    run = run_pytest(tmp_path, "-rA", "-q", "test_project.py")
    output = run.stdout + run.stderr
    assert "Error while loading plugin" not in output and "Traceback" not in output, output
    assert "PASSED test_project.py::test_unrelated" in output
    assert "PASSED test_project.py::test_hypothesis_cannot_be_imported" in output
    assert "ERROR test_project.py::test_uses_the_fixture" in output
    needs = "decodekit's conformance checks need Hypothesis: pip install hypothesis (or decodekit[test])"
    assert output.count(needs) >= 1 and "not reached" not in output
    # the fixture's error is that one line, with no stack of frames above it
    error_section = output.split("ERROR at setup of test_uses_the_fixture")[1].split("=====")[0]
    assert [line for line in error_section.splitlines() if line.strip("_ ")] == [needs], error_section
    assert run.returncode == 1  # a test error, not pytest's 3 (internal error) or 4 (usage error)


def test_the_plugin_is_the_one_pytest_loaded(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_listed.py").write_text("def test_nothing():\n    pass\n")
    run = run_pytest(tmp_path, "--trace-config", "-q", "test_listed.py")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "decodekit/testing/pytest_plugin.py" in run.stdout.replace(os.sep, "/")
