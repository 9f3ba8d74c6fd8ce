"""The `decode` command's output: an existing output_file is never lost, records are written one
at a time (an interrupt keeps every complete line and no partial one), and a closed stdout
(``decode --help | head -2``) ends the command quietly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import COMMAND, env  # noqa: E402


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"], ["list=true"]])
def test_a_reader_that_goes_away_ends_the_command_without_a_traceback(args: list[str], tmp_path: Path) -> None:
    proc = subprocess.Popen([*COMMAND, *args], cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `head` does once it has its lines; here before anything is written
    with proc.stderr:
        err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert err == "", err
    assert proc.returncode == 1
