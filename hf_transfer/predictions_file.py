"""The predictions file of `hf-transfer predict`: CSV or parquet, appended chunk by chunk, with a progress record that lets an
interrupted run resume after its last finished chunk."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import PredictError


class PredictionsFile:
    """The output, appended chunk by chunk. Until the run completes, a progress record beside it says how many rows (and, for
    CSV, bytes) are final: a run killed mid-chunk resumes from there. CSV chunks go straight into the file; parquet chunks
    into part files beside it, joined into the file at the end (a parquet file is only readable once complete)."""

    def __init__(self, path: Path, names: list[str], fingerprint: str, total: int, resume: bool):
        self.path, self.names, self.fingerprint, self.total = path, names, fingerprint, total
        self.parquet = path.suffix.lower() == ".parquet"
        self.progress_path = path.with_name(f".{path.name}.progress.json")
        self.parts = path.with_name(f".{path.name}.parts")
        self.rows_done, self.bytes_done, self.complete = 0, 0, False
        try:
            self._open(resume)
        except OSError as error:
            raise PredictError(f"Cannot write the predictions to {str(path)!r}: {error.strerror or error}. Choose a writable "
                               "`--output`.") from None

    def _open(self, resume: bool) -> None:
        if self.progress_path.is_file():
            progress = json.loads(self.progress_path.read_text())
            if not resume:
                raise PredictError(f"{str(self.path)!r} holds an interrupted run's first {progress['rows']} of {progress['total']} "
                                   f"predictions. Pass `--resume` to continue it, or delete {str(self.path)!r} and "
                                   f"{str(self.progress_path)!r} to start over.")
            if progress["fingerprint"] != self.fingerprint or progress["columns"] != self.names:
                raise PredictError(f"{str(self.path)!r} was started with another model, backend, --top_k or other images: `--resume` "
                                   "continues only the same command. Run that command, or choose another `--output`.")
            self.rows_done, self.bytes_done = progress["rows"], progress.get("bytes", 0)
            self._drop_unfinished()
            return
        if self.path.exists():
            if resume:
                self.complete = True  # nothing to resume: it finished
                return
            raise PredictError(f"{str(self.path)!r} already exists. Choose another `--output`, or delete it to predict again.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.parquet:
            self.parts.mkdir(exist_ok=True)
        else:
            with open(self.path, "w", newline="", encoding="utf-8") as file:
                csv.writer(file).writerow(self.names)
            self.bytes_done = self.path.stat().st_size
        self._record()

    def _drop_unfinished(self) -> None:
        """What a killed run wrote after its last recorded chunk: CSV bytes past the record, part files past its rows."""
        if self.parquet:
            for part in sorted(self.parts.glob("part-*.parquet")):
                if int(part.stem.split("-")[1]) >= self.rows_done:
                    part.unlink()
        else:
            with open(self.path, "r+b") as file:
                file.truncate(self.bytes_done)

    def _record(self) -> None:
        progress = {"fingerprint": self.fingerprint, "columns": self.names, "rows": self.rows_done, "total": self.total,
                    "bytes": self.bytes_done}
        staged = self.progress_path.with_name(self.progress_path.name + ".tmp")
        staged.write_text(json.dumps(progress))
        os.replace(staged, self.progress_path)

    def append(self, rows: list[list]) -> None:
        """Make `rows` final: written, flushed to disk, then counted in the progress record."""
        if self.complete or not rows:
            return
        if self.parquet:
            part = self.parts / f"part-{self.rows_done:012d}.parquet"
            pq.write_table(self._table(rows), part.with_suffix(".tmp"))
            os.replace(part.with_suffix(".tmp"), part)
        else:
            text = io.StringIO()
            csv.writer(text).writerows(rows)
            with open(self.path, "ab") as file:
                file.write(text.getvalue().encode())
                file.flush()
                os.fsync(file.fileno())
            self.bytes_done = self.path.stat().st_size
        self.rows_done += len(rows)
        self._record()

    def _table(self, rows: list[list]) -> pa.Table:
        types = {name: pa.float64() if name.startswith("score_") else pa.string() for name in self.names}
        return pa.table({name: pa.array([row[i] for row in rows], type=types[name]) for i, name in enumerate(self.names)})

    def finish(self) -> None:
        """The complete file: parquet parts joined; the progress record removed."""
        if self.complete:
            return
        if self.parquet:
            parts = sorted(self.parts.glob("part-*.parquet"))
            table = pa.concat_tables([pq.read_table(part) for part in parts]) if parts else self._table([])
            staged = self.path.with_name(f".{self.path.name}.tmp")
            pq.write_table(table, staged)
            os.replace(staged, self.path)
            for part in parts:
                part.unlink()
            self.parts.rmdir()
        self.progress_path.unlink()
        self.complete = True

    def read(self) -> list[dict]:
        if self.parquet:
            return pq.read_table(self.path).to_pylist()
        with open(self.path, newline="", encoding="utf-8") as file:
            return list(csv.DictReader(file))
