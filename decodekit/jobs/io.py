"""A job's files: input rows read lazily, output parts committed atomically, the manifest.

The output folder holds:

- ``job.json``: the job's signature (:func:`decodekit.jobs.spec.job_signature`); a folder
  written by another job is refused rather than mixed;
- ``part-00000.jsonl`` (or ``.parquet``), ...: the results, a part at a time. A part is written
  to ``part-XXXXX.jsonl.tmp``, fsynced, renamed to its name and the folder fsynced; only then
  is it *committed*, by one line appended to
- ``manifest.jsonl``: per committed part its file, the keys of the input rows it finished
  (:func:`decodekit.jobs.spec.row_key`: the id, or a hash of a row without one), their ids,
  and its bad rows (id, reason). The manifest is the truth: on restart a ``.tmp`` file, a part
  that no manifest line names (killed between the rename and the manifest line) and a torn
  last manifest line are removed, and the rows they held are decoded again;
- ``errors.jsonl``: one line per bad row (id, row, reason), rewritten from the manifest
  (tmp + rename) whenever a part with bad rows is committed.

So whenever the job is killed (``kill -9`` included), the committed parts hold every finished
row exactly once, and a rerun decodes only the rest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decodekit.errors import ConfigError

MANIFEST = "manifest.jsonl"
ERRORS = "errors.jsonl"
SIGNATURE = "job.json"


# ------------------------------------------------------------------------------ input


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("Parquet files need pyarrow: pip install 'decodekit[jobs]'") from None
    return pq


class Unparsed(str):
    """A JSONL line that is not JSON (the job reports it as a bad row and goes on)."""

    reason: str


def parse_line(line: str) -> Any:
    """One JSONL line as its value, or :class:`Unparsed` with the reason."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        bad = Unparsed(line.rstrip("\n"))
        bad.reason = f"not JSON ({e.msg})"
        return bad


def read_rows(path: str) -> Iterator[tuple[int, Any]]:
    """``(row number, row)`` for each row of a JSONL or Parquet file, read lazily.

    Blank JSONL lines are skipped but keep their numbers (a row's number is its line, from 0).
    """
    if Path(path).suffix.lower() in (".parquet", ".pq"):
        number = 0
        for batch in _pyarrow_parquet().ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield number, row
                number += 1
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f):
            if line.strip():
                yield number, parse_line(line)


def scan_input(path: str) -> tuple[int, dict[str, int]]:
    """How many rows the input has, and the keys of ids that appear on more than one row."""
    from decodekit.jobs.spec import row_key

    counts: dict[str, int] = {}
    total = 0
    if Path(path).suffix.lower() in (".parquet", ".pq"):
        file = _pyarrow_parquet().ParquetFile(path)
        names = file.schema_arrow.names
        rows: Iterator[Any] = (
            row for batch in file.iter_batches(batch_size=65536, columns=["id"] if "id" in names else [])
            for row in batch.to_pylist()
        )  # fmt: skip
        if "id" not in names:
            return int(file.metadata.num_rows), {}
    else:
        rows = (row for _, row in read_rows(path))
    for row in rows:
        total += 1
        key = row_key(row)
        counts[key] = counts.get(key, 0) + 1
    return total, {k: n for k, n in counts.items() if n > 1 and not k.startswith("row:")}


# ------------------------------------------------------------------------------ output


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or what it held before, never a part of it: tmp, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def encode_part(records: list[dict[str, Any]], fmt: str) -> bytes:
    """A part's bytes: JSON lines, or a Parquet table (``settings`` as a JSON string)."""
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    import io

    import pyarrow as pa

    pq = _pyarrow_parquet()
    columns = {key: [r[key] for r in records] for key in records[0]}  # every record has the same keys
    columns["settings"] = [json.dumps(s, sort_keys=True) for s in columns["settings"]]
    table = pa.Table.from_pydict(columns)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def decode_part(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    rows = _pyarrow_parquet().read_table(path).to_pylist()
    return [{**r, "settings": json.loads(r["settings"])} for r in rows]


def write_part(folder: str | Path, name: str, records: list[dict[str, Any]], fmt: str) -> str | None:
    """Write ``records`` as the part ``name`` atomically (not yet committed); None when there are none."""
    if not records:
        return None
    write_atomically(Path(folder) / name, encode_part(records, fmt))
    return name


@dataclass
class Committed:
    """What the manifest says is finished."""

    keys: set[str] = field(default_factory=set)  # row keys finished, good and bad
    results: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)


class JobFolder:
    """The output folder of one job: its signature, committed parts and manifest."""

    def __init__(self, path: str | Path, fmt: str) -> None:
        self.path = Path(path)
        self.fmt = fmt
        self.committed = Committed()
        self.next_part = 0

    @classmethod
    def open(cls, path: str | Path, signature: dict[str, Any], fmt: str) -> JobFolder:
        """The folder for this job: new, or one this same job started (then recovered)."""
        folder = cls(path, fmt)
        folder._claim(signature)
        folder.recover()
        return folder

    def _claim(self, signature: dict[str, Any]) -> None:
        name = f"job.output={str(self.path)!r}"
        self.path.mkdir(parents=True, exist_ok=True)
        stored_path = self.path / SIGNATURE
        if stored_path.exists():
            stored = json.loads(stored_path.read_text(encoding="utf-8"))
            differ = sorted(k for k in {*stored, *signature} if stored.get(k) != signature.get(k))
            if differ:
                raise ConfigError(
                    f"{name}: holds results of another job (it differs in {', '.join(differ)}); "
                    "give another folder, or rerun that job's command to resume it"
                )
            return
        if any(self.path.iterdir()):
            raise ConfigError(f"{name}: the folder holds other files and no {SIGNATURE}; give an empty or new folder")
        write_atomically(stored_path, (json.dumps(signature, indent=1, sort_keys=True) + "\n").encode("utf-8"))

    def recover(self) -> Committed:
        """Read the manifest; remove what a killed run left half done (see the module doc)."""
        manifest = self.path / MANIFEST
        committed = Committed()
        if manifest.exists():
            data = manifest.read_bytes()
            good = 0
            for line in data.splitlines(keepends=True):
                try:
                    entry = json.loads(line) if line.endswith(b"\n") else None
                except json.JSONDecodeError:
                    entry = None
                if entry is None:  # a torn last line: that part was not committed
                    break
                good += len(line)
                committed.keys.update(entry["keys"])
                committed.results += len(entry["ids"])
                committed.errors.extend(entry["errors"])
                if entry["part"] is not None:
                    committed.parts.append(entry["part"])
            if good < len(data):
                with open(manifest, "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
        names = set(committed.parts)
        for item in self.path.iterdir():
            if item.name.startswith("part-") and item.name not in names:
                item.unlink()  # a .tmp, or renamed but never committed: its rows run again
        numbers = [int(p[5:10]) for p in committed.parts if p[5:10].isdigit()]  # Ray's parts are named by hash
        self.next_part = max(numbers, default=-1) + 1
        self.committed = committed
        return committed

    def commit(self, records: list[dict[str, Any]], keys: list[str], errors: list[dict[str, Any]]) -> None:
        """Write one part atomically, then record it in the manifest: from here it is finished."""
        name = f"part-{self.next_part:05d}.{self.fmt}"
        self.next_part += 1
        self.record(write_part(self.path, name, records, self.fmt), keys, [r["id"] for r in records], errors)

    def record(self, part: str | None, keys: list[str], ids: list[Any], errors: list[dict[str, Any]]) -> None:
        """Commit a part already written (``part``: its file name, None for bad rows alone)."""
        entry = {"part": part, "keys": keys, "ids": ids, "errors": errors}
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.committed.keys.update(keys)
        self.committed.results += len(ids)
        if part is not None:
            self.committed.parts.append(part)
        if errors:
            self.committed.errors.extend(errors)
            self.write_errors()

    def write_errors(self) -> None:
        text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.committed.errors)
        write_atomically(self.path / ERRORS, text.encode("utf-8"))


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Every committed result row of a job's output folder (parts in manifest order)."""
    folder = Path(path)
    manifest = folder / MANIFEST
    if not manifest.exists():
        return []
    rows: list[dict[str, Any]] = []
    for line in manifest.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        part = json.loads(line)["part"]
        if part is not None:
            rows.extend(decode_part(folder / part))
    return rows


def read_errors(path: str | Path) -> list[dict[str, Any]]:
    """The bad rows of a job's output folder (id, row, reason)."""
    errors = Path(path) / ERRORS
    if not errors.exists():
        return []
    return [json.loads(line) for line in errors.read_text(encoding="utf-8").splitlines() if line]
