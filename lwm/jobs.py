"""Batch inputs and resumable outputs of the entry points' list modes (JSONL in, JSONL out).

    jobs = read_jobs("questions.jsonl", ("id", "input_file", "question"), paths=("input_file",))
    with ResultWriter("answers.jsonl") as out:
        for job in jobs:
            if job["id"] not in out.done:
                out.write({**job, "answer": ...})

A job file holds one JSON object a line; relative paths under `paths` are relative to the job
file's folder. Results are appended one line at a time and flushed (locally; a bucket object is
rewritten whole after each), so a killed run resumes at the first job without a result.
"""
from __future__ import annotations

import json
import os

from lwm import storage


def read_jobs(path: str, required: tuple[str, ...], paths: tuple[str, ...] = ()) -> list[dict]:
    """The job lines of `path`; a malformed line, a missing key or a repeated id is one error naming the line."""
    base = storage.dirname(path) if storage.is_remote(path) else os.path.dirname(os.path.abspath(path))
    jobs, seen = [], set()
    for number, line in enumerate(storage.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            job = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        missing = [k for k in required if not isinstance(job, dict) or k not in job]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}; each line needs {list(required)}")
        job["id"] = str(job["id"])
        if job["id"] in seen:
            raise ValueError(f"{where}: id {job['id']!r} occurs twice (an id names one result, for resuming)")
        seen.add(job["id"])
        for key in paths:
            value = job[key]
            if not storage.is_remote(value) and not os.path.isabs(value):
                job[key] = storage.join(base, value)
        jobs.append(job)
    return jobs


class ResultWriter:
    """Appends result lines to a JSONL file; `done` holds the ids already there (a torn last line is dropped)."""

    def __init__(self, path: str):
        self.path = path
        self.lines: list[str] = []
        if storage.exists(path):
            complete = storage.read_text(path).split("\n")[:-1]  # what follows the last newline is torn or ''
            self.lines = [line for line in complete if line.strip()]
        self.done = {json.loads(line)["id"] for line in self.lines}
        self._file = None

    def __enter__(self) -> "ResultWriter":
        if not storage.is_remote(self.path):
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            storage.write_text(self.path, "".join(line + "\n" for line in self.lines))  # drops a torn line
            self._file = open(self.path, "a")
        return self

    def write(self, record: dict) -> None:
        line = json.dumps(record)
        self.lines.append(line)
        self.done.add(str(record["id"]))
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            storage.write_text(self.path, "".join(x + "\n" for x in self.lines))

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
