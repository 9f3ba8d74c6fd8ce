"""`decode interactive=true` driven through its stdin, as a subprocess.

Uses the tiny unigram checkpoint of test_configs.py: greedy decoding always picks 'a', and
``strategy=top_k top_k=2`` only ever 'a' or 'b', so the session's text can be followed exactly.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_configs import write_unigram  # noqa: E402  (the shared tiny checkpoint)

COMMAND = [sys.executable, "-m", "decodekit.cli.main"]
ENV = {**os.environ, "DECODEKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def model_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("unigram")
    write_unigram(folder)
    return ["model=checkpoint", f"model.path={folder}", "interactive=true"]


def test_a_scripted_session_sets_reports_clears_and_ends_at_end_of_input(model_args: list[str], tmp_path: Path) -> None:
    script = "\n".join([
        "ab",                                      # top_k=2: 8 new tokens, each 'a' or 'b'
        "/help",
        "/set top_p=1.5",                          # refused, as on the command line
        "/set strategy=greedy max_new_tokens=4",
        "/status",
        "ab",                                      # greedy: 'aaaa'
        "/status",
        "/clear",
        "/set threads=1",                          # the threads the next texts decode on
        "/status",
        "/sett x",
    ]) + "\n"  # fmt: skip
    run = subprocess.run([*COMMAND, *model_args, "strategy=top_k", "top_k=2", "max_new_tokens=8", "seed=0"],
                         input=script, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr  # end of input (Ctrl-D) leaves cleanly
    out = run.stdout
    first = re.search(r"^> ([ab]{8})\n", out, flags=re.MULTILINE)
    assert first, out
    for command in ("/help", "/set", "/status", "/clear", "/quit"):
        assert re.search(rf"^(> )?  {command} +\S", out, flags=re.MULTILINE), command
    assert "ok: strategy=greedy max_new_tokens=4" in out
    statuses = re.findall(r"^(?:> )?model: .*, (cpu with \d+ threads?), .*\nstrategy: (\S+) .*\n.*\nmax_new_tokens=(\d+) .*\n.*\ntext: (\d+) characters", out, flags=re.MULTILINE)
    # after the first turn, after the second ('ab' typed + 'aaaa'), after /clear and threads=1
    assert [s[1:] for s in statuses] == [("greedy", "4", "10"), ("greedy", "4", "16"), ("greedy", "4", "0")]
    assert statuses[2][0] == "cpu with 1 thread" and statuses[0][0] == statuses[1][0], statuses
    assert re.search(r"^> aaaa\n", out, flags=re.MULTILINE)
    assert "(the session's text is cleared)" in out
    assert run.stderr.splitlines() == [
        "error: top_p=1.5 is not allowed: must be <= 1.0",
        "error: unknown command /sett (did you mean '/set'?); /help lists the commands",
    ]


class Reader:
    """Collects a subprocess's stdout on a thread, so the test can wait for a piece of text."""

    def __init__(self, stream) -> None:
        self.chunks: queue.Queue[str] = queue.Queue()
        self.text = ""
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        for chunk in iter(lambda: stream.read(1), ""):
            self.chunks.put(chunk)

    def wait_for(self, pattern: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {pattern!r} in {self.text[-300:]!r}"
            try:
                self.text += self.chunks.get(timeout=min(remaining, 1))
            except queue.Empty:
                pass
        return self.text


def test_ctrl_c_stops_the_generation_and_quit_leaves(model_args: list[str], tmp_path: Path) -> None:
    with subprocess.Popen([*COMMAND, *model_args, "strategy=greedy", "max_new_tokens=100000"], cwd=tmp_path, env=ENV,
                          text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:  # fmt: skip
        reader = Reader(proc.stdout)
        try:
            reader.wait_for(r"\n> $")
            proc.stdin.write("xy\n")
            proc.stdin.flush()
            reader.wait_for(r"\n> a{20}")  # greedy text streams
            proc.send_signal(signal.SIGINT)
            reader.wait_for(r"a \[stopped\]\n> $")
            assert proc.poll() is None  # back at the prompt, not ended
            proc.stdin.write("/set max_new_tokens=3\nzz\n/quit\n")
            proc.stdin.flush()
            proc.wait(timeout=120)
            reader.thread.join(timeout=10)
            reader.wait_for(r"ok: max_new_tokens=3\n> aaa\n> \n?$", timeout=10)
            errors = proc.stderr.read()
        finally:
            proc.kill()
    assert proc.returncode == 0
    assert errors == ""
