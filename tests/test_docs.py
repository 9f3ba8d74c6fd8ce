"""The docs cannot rot: their Python blocks run, and the README's commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# pages whose ```python blocks run here, in order, sharing one namespace per page
# (docs/plugins.md has its own test; docs/cli.md shows shell sessions)
PAGES = ["processors.md", "loop.md", "default_model.md", "models.md", "engine.md", "jobs.md", "structured.md", "logprobs.md", "gpu.md"]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", [*PAGES, "../README.md"])
def test_python_blocks_run(page: str, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = python_blocks(ROOT / "docs" / page)
    assert blocks, f"docs/{page} has no python blocks"
    namespace: dict[str, object] = {"__name__": f"docs_{page}"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/{page}[block {i}]", "exec"), namespace)
        except Exception as exc:  # report which block broke
            raise AssertionError(f"docs/{page} block {i} failed: {type(exc).__name__}: {exc}\n{block}") from exc


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert first_block, "README.md must open with a bash block of two commands"
    return [line for line in first_block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_second() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    assert "decode" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


def test_readme_install_path_takes_the_cpu_torch_wheel() -> None:
    for command in readme_commands():
        assert "torch==2.13.0" in command
