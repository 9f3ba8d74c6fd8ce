"""Decoding jobs (decodekit.jobs, `decode job.input=... job.output=...`): every row exactly once.

The output of a job, killed with SIGKILL at any point and run again, holds every id exactly
once and equals an uninterrupted run; a row's result does not depend on order, part size or
slot count; bad rows land in the errors file with their id and reason while the job goes on.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from decodekit.cli.config import compose_config
from decodekit.cli.job_run import run_job_command
from decodekit.errors import ConfigError
from decodekit.jobs import Decoding, JobConfig, read_errors, read_results, row_seed, run_job
from decodekit.jobs.io import MANIFEST
from decodekit.models import load_model
from decodekit.tokenization import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from test_configs import registry  # noqa: E402, F401  (the fixture: built-ins in Hydra's ConfigStore)

COMMAND = [sys.executable, "-m", "decodekit.cli.main"]
DECODING = Decoding(settings={"temperature": 0.9, "top_p": 0.95}, max_new_tokens=6, seed=11)


@pytest.fixture(scope="module")
def loaded():
    model, extras = load_model("default", device="cpu")
    return model, load_tokenizer("auto", extras), str(extras.source)


def write_rows(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def good_rows(n: int) -> list[dict[str, object]]:
    return [{"id": f"r{i}", "prompt": f"Row {i} says"} for i in range(n)]


def by_id(rows: list[dict[str, object]]) -> dict[object, dict[str, object]]:
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id appears more than once"
    return {r["id"]: r for r in rows}


def assert_same_rows(rows: list[dict], reference: dict) -> None:
    """Each id once, every field equal, logprobs to float rounding (rows decoded beside other rows)."""
    found = by_id(rows)
    assert found.keys() == reference.keys()
    for row_id, row in found.items():
        lp, ref = row.pop("logprobs"), dict(reference[row_id])
        assert row == {k: v for k, v in ref.items() if k != "logprobs"}
        assert lp["tokens"] == ref["logprobs"]["tokens"] and lp["top_ids"] == ref["logprobs"]["top_ids"]
        assert lp["logprobs"] == pytest.approx(ref["logprobs"]["logprobs"], abs=1e-5)


def job(tmp_path: Path, src: Path, out: str, **kw: object) -> JobConfig:
    return JobConfig(input=str(src), output=str(tmp_path / out), progress_every=0, **kw)


def test_every_row_once_and_bad_rows_in_the_errors_file(tmp_path: Path, loaded, capsys) -> None:
    rows: list[object] = good_rows(9)
    rows += [
        "not json",
        {"prompt": "no id"},
        {"id": "r3", "prompt": "a duplicate id"},
        {"id": "both", "prompt": "x", "prompt_tokens": [1]},
        {"id": "bad-top-p", "prompt": "x", "settings": {"top_p": 3}},
        {"id": 7, "prompt_tokens": [84, 104, 101], "settings": {"temperature": 0}, "max_new_tokens": 3, "seed": 5},
    ]
    src = write_rows(tmp_path / "in.jsonl", rows)
    run_job(job(tmp_path, src, "out", part_size=4, slots=3), decoding=DECODING, loaded=loaded)
    results = by_id(read_results(tmp_path / "out"))
    assert results[7]["settings"] == {"temperature": 0, "top_p": 0.95} and len(results[7]["tokens"]) <= 3
    assert results[7]["seed"] == 5 and results["r0"]["seed"] == row_seed(11, "r0")
    assert results["r0"]["model"] == loaded[2]
    errors = {(e["row"], e["id"]): e["reason"] for e in read_errors(tmp_path / "out")}
    assert set(results) == {f"r{i}" for i in range(9) if i != 3} | {7}
    assert set(errors) == {(9, None), (10, None), (3, "r3"), (12, "both"), (13, "bad-top-p")}  # r3: once
    assert errors[(9, None)] == "not JSON (Expecting value)"
    assert errors[(3, "r3")] == "id='r3': appears on 2 rows; ids must be unique"
    assert "top_p=3" in errors[(13, "bad-top-p")] and "\n" not in errors[(13, "bad-top-p")]
    assert "decode job: 15/15 rows (100.0%), 5 bad" in capsys.readouterr().err  # r3's two rows: one bad row


def test_results_do_not_depend_on_order_part_size_or_slots(tmp_path: Path, loaded) -> None:
    rows = good_rows(10)
    a = write_rows(tmp_path / "a.jsonl", rows)
    b = write_rows(tmp_path / "b.jsonl", random.Random(0).sample(rows, len(rows)))
    run_job(job(tmp_path, a, "a", part_size=3, slots=4), decoding=DECODING, loaded=loaded)
    run_job(job(tmp_path, b, "b", part_size=10, slots=2), decoding=DECODING, loaded=loaded)
    assert by_id(read_results(tmp_path / "a")) == by_id(read_results(tmp_path / "b"))


def test_a_crash_between_rename_and_manifest_or_mid_write_is_redone_once(tmp_path: Path, loaded) -> None:
    src = write_rows(tmp_path / "in.jsonl", good_rows(8))
    run_job(job(tmp_path, src, "ref", part_size=2), decoding=DECODING, loaded=loaded)
    out = tmp_path / "out"
    run_job(job(tmp_path, src, "out", part_size=2), decoding=DECODING, loaded=loaded)
    manifest = out / MANIFEST
    lines = manifest.read_bytes().splitlines(keepends=True)
    manifest.write_bytes(b"".join(lines[:2]) + lines[2][:10])  # a torn line: part 2 renamed, not committed
    (out / "part-00009.jsonl.tmp").write_text('{"id": "r0", "text": "half')  # a part killed mid-write
    assert len(read_results(out)) == 4
    run_job(job(tmp_path, src, "out", part_size=2), decoding=DECODING, loaded=loaded)
    assert by_id(read_results(out)) == by_id(read_results(tmp_path / "ref"))
    assert not list(out.glob("*.tmp"))


def test_a_folder_of_another_job_is_refused(tmp_path: Path, loaded) -> None:
    src = write_rows(tmp_path / "in.jsonl", good_rows(2))
    run_job(job(tmp_path, src, "out"), decoding=DECODING, loaded=loaded)
    other = Decoding(settings=DECODING.settings, max_new_tokens=6, seed=12)
    with pytest.raises(ConfigError, match=r"job.output=.*holds results of another job \(it differs in seed\)"):
        run_job(job(tmp_path, src, "out"), decoding=other, loaded=loaded)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files and no job.json"):
        run_job(job(tmp_path, src, "full"), decoding=DECODING, loaded=loaded)


def test_parquet_in_and_out_equals_jsonl(tmp_path: Path, loaded) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = good_rows(5) + [{"id": "t", "prompt_tokens": [84, 104], "settings": {"top_k": 3}}]
    columns = {key: [r.get(key) for r in rows] for key in ("id", "prompt", "prompt_tokens", "settings")}
    pq.write_table(pa.Table.from_pydict(columns), tmp_path / "in.parquet")  # absent keys are nulls there
    src = write_rows(tmp_path / "in.jsonl", rows)
    run_job(job(tmp_path, tmp_path / "in.parquet", "pq", part_size=4), decoding=DECODING, loaded=loaded)
    run_job(job(tmp_path, src, "js", part_size=4), decoding=DECODING, loaded=loaded)
    assert sorted(p.name for p in (tmp_path / "pq").glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    assert by_id(read_results(tmp_path / "pq")) == by_id(read_results(tmp_path / "js"))


# ------------------------------------------------------------------------------ the command, killed


def decode_job(args: list[str], cwd: Path) -> subprocess.Popen:
    environ = {**os.environ, "DECODEKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    base = ["job.input=in.jsonl", "job.part_size=3", "job.slots=4", "job.progress_every=0", "max_new_tokens=8",
            "seed=3", "device=cpu"]  # fmt: skip
    return subprocess.Popen([*COMMAND, *base, *args], cwd=cwd, env=environ, text=True, stderr=subprocess.PIPE)


def test_kill_9_then_the_same_command_resumes_with_every_id_exactly_once(tmp_path: Path) -> None:
    write_rows(tmp_path / "in.jsonl", good_rows(150))  # a few seconds: killed long before the end
    reference = decode_job(["job.output=ref"], tmp_path)
    killed = decode_job(["job.output=out"], tmp_path)
    assert killed.stderr is not None
    line = killed.stderr.readline()  # the first committed part (mid-way through the next ones)
    assert line.startswith("decode job: 3/150 rows"), line
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    killed.stderr.close()
    done = len(read_results(tmp_path / "out"))
    assert 3 <= done < 150
    resumed = decode_job(["job.output=out"], tmp_path)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"decode job: {done + 3}/150 rows" in err  # it took up where the committed parts end
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    assert by_id(read_results(tmp_path / "out")) == by_id(read_results(tmp_path / "ref"))
    assert len(read_results(tmp_path / "out")) == 150


REFUSED = [
    (["job.logprobs=true"], "job.logprobs=True is not allowed: must be a number, not a boolean"),
    (["job.logprobs=21"], "job.logprobs=21 is not allowed: must be <= 20"),
    (["job.logprobs_mode=scaled"], "job.logprobs_mode='scaled' is not allowed: must be one of 'raw' or 'processed'"),
    (["logprobs=5"], "logprobs: a job takes job.logprobs and job.logprobs_mode; drop it or drop job.input"),
    (["prompt=hi"], "prompt: not used by a job (rows give their own prompts); drop it or drop job.input"),
    (["strategy=beam"], "sampler='beam': a job decodes on the request engine, which samples multinomial "
                        "(temperature=0: greedy); beam search and plugin samplers are not supported in jobs"),
    (["job.part_size=0"], "job.part_size=0 is not allowed: must be >= 1"),
    (["job.ray.num_cpus=true"], "job.ray.num_cpus=True is not allowed: must be a number, not a boolean"),
    (["job.runner=ray", "threads=2"], "threads=2: a Ray job's actors each decode on job.ray.num_cpus threads; "
                                      "set job.ray.num_cpus instead"),
    (["job.outptu=o"], "job.outptu: job has no key 'outptu' (did you mean 'output'?); its keys: input, output, "
                       "runner, format, part_size, slots, logprobs, logprobs_mode, progress_every, ray"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), REFUSED, ids=[a[0] for a, _ in REFUSED])
def test_the_command_refuses_what_a_job_cannot_take(registry, tmp_path: Path, args: list[str], message: str) -> None:
    src = write_rows(tmp_path / "in.jsonl", good_rows(1))
    with pytest.raises(ConfigError) as refused:
        _, config = compose_config([f"job.input={src}", f"job.output={tmp_path / 'o'}", *args], registry)
        run_job_command(config)  # refused before the model loads
    assert str(refused.value) == message
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ on Ray


def test_the_ray_runner_gives_the_local_runners_output_and_resumes_exactly_once(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")  # the `ray` extra; CI installs it (README's second command)

    rows: list[object] = good_rows(10) + ["not json", {"id": "r2", "prompt": "again"}, {"id": "bad", "prompt": "x", "settings": {"top_p": 3}}]
    src = write_rows(tmp_path / "in.jsonl", rows)
    run_job(job(tmp_path, src, "local", part_size=4, logprobs=2), "default", DECODING)
    cluster = JobConfig(input=str(src), output=str(tmp_path / "ray"), runner="ray", progress_every=0, logprobs=2,
                        ray={"actors": 2, "batch_size": 4, "num_cpus": 0.5})  # fmt: skip
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")  # more CPUs than cores
    try:
        run_job(cluster, "default", DECODING)
        local = by_id(read_results(tmp_path / "local"))
        assert_same_rows(read_results(tmp_path / "ray"), local)  # per-token logprobs too (job.logprobs=2)
        assert len(local) == 9 and all(len(r["logprobs"]["top_ids"][0]) == 2 for r in local.values())
        errors = {(e["id"], e["reason"]) for e in read_errors(tmp_path / "local")}
        assert {(e["id"], e["reason"]) for e in read_errors(tmp_path / "ray")} == errors and len(errors) == 3
        manifest = tmp_path / "ray" / MANIFEST
        lines = manifest.read_bytes().splitlines(keepends=True)
        manifest.write_bytes(lines[0] + lines[1][:7])  # killed mid-way: one part committed, one torn
        run_job(cluster, "default", DECODING)
    finally:
        ray.shutdown()
    assert_same_rows(read_results(tmp_path / "ray"), local)
    assert {(e["id"], e["reason"]) for e in read_errors(tmp_path / "ray")} == errors
    parts = [json.loads(line)["part"] for line in manifest.read_text().splitlines()]
    assert sorted(p.name for p in (tmp_path / "ray").glob("part-*")) == sorted(p for p in parts if p)  # no orphans


RAY_ARGS = ["job.runner=ray", "job.ray.actors=2", "job.ray.num_cpus=0.5", "job.ray.batch_size=3"]


def test_the_ray_command_killed_with_sigkill_resumes_exactly_once(tmp_path: Path) -> None:
    pytest.importorskip("ray")  # the `ray` extra; CI installs it (README's second command)
    write_rows(tmp_path / "in.jsonl", good_rows(60))
    reference = decode_job(["job.output=ref"], tmp_path)  # the local runner, uninterrupted
    killed = decode_job(["job.output=out", *RAY_ARGS], tmp_path)  # starts its own local cluster
    assert killed.stderr is not None
    line = next(line for line in killed.stderr if line.startswith("decode job:"))  # Ray logs lines of its own
    assert line.startswith("decode job: 3/60 rows"), line  # the first committed part; actors mid-way through others
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    killed.stderr.close()
    done = len(read_results(tmp_path / "out"))
    assert 3 <= done < 60
    resumed = decode_job(["job.output=out", *RAY_ARGS], tmp_path)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    counts = [int(line.split()[2].split("/")[0]) for line in err.splitlines() if line.startswith("decode job:")]
    assert counts[0] in (done, done + 3) and counts[-1] == 60, counts  # it took up where the committed parts end
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    assert by_id(read_results(tmp_path / "out")) == by_id(read_results(tmp_path / "ref"))
    assert len(read_results(tmp_path / "out")) == 60
    manifest = [json.loads(line)["part"] for line in (tmp_path / "out" / MANIFEST).read_text().splitlines()]
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*")) == sorted(p for p in manifest if p)  # no orphans


def test_an_actor_pool_that_leaves_the_read_tasks_no_cpu_is_refused() -> None:
    from decodekit.jobs.ray_runner import check_room
    from decodekit.jobs.spec import RayConfig

    check_room(RayConfig(actors=2, num_cpus=0.5), 2.0)  # one CPU left for reading
    with pytest.raises(ConfigError) as refused:
        check_room(RayConfig(actors=2, num_cpus=1), 2.0)
    assert str(refused.value) == (
        "job.ray.actors=2 x job.ray.num_cpus=1 takes 2 of the cluster's 2 CPUs; the input's read tasks need 1 free, "
        "so the job would never start: use fewer actors or a fraction of a CPU each (job.ray.num_cpus=0.5)"
    )
