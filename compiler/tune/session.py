"""Autotuning sessions: every measurement is one JSON line, keyed by a hardware/backend fingerprint.

`measurements.jsonl` in the session folder is append-only; each record is written with one
`write` + flush + fsync, so killing the tuner at any moment loses at most the measurement in
flight (a torn last line is ignored on reading). Rerunning the tuner resumes: measurements whose
(fingerprint, kind, key) are already present are not taken again. The session's decision lives in
`choice.json` (written via a temporary file and a rename).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skiptree.errors import SkiptreeError

MEASUREMENTS = "measurements.jsonl"
CHOICE = "choice.json"


class SessionError(SkiptreeError):
    """A tuning session that cannot be used as asked."""


@dataclass
class TuneSession:
    folder: Path
    fingerprint: str
    records: dict[tuple[str, str], Any] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path, fingerprint: str) -> TuneSession:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        session = cls(folder, fingerprint)
        path = folder / MEASUREMENTS
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill: that measurement is taken again
                if record.get("fingerprint") == fingerprint:
                    session.records[(record["kind"], record["key"])] = record["value"]
        return session

    def get(self, kind: str, key: str) -> Any:
        return self.records.get((kind, key))

    def put(self, kind: str, key: str, value: Any) -> None:
        record = {"fingerprint": self.fingerprint, "kind": kind, "key": key, "value": value,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        with open(self.folder / MEASUREMENTS, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records[(kind, key)] = value

    def measure(self, kind: str, key: str, take: Callable[[], Any], log: Callable[[str], None]) -> Any:
        """The stored measurement, or `take()` it now and store it (a rerun resumes here)."""
        value = self.get(kind, key)
        if value is None:
            log(f"  measuring {kind} {key}")
            value = take()
            self.put(kind, key, value)
        return value

    def write_choice(self, choice: dict[str, Any]) -> None:
        tmp = self.folder / f".{CHOICE}.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, **choice}, indent=2) + "\n")
        os.replace(tmp, self.folder / CHOICE)


def read_choice(folder: Path, fingerprint: str, model_sha256: str | None = None,
                force: bool = False) -> dict[str, Any]:  # fmt: skip
    """The session's decision, refused when it was tuned on other hardware or backend, or for
    another model (weights sha256), unless `force`."""
    path = Path(folder) / CHOICE
    if not path.is_file():
        raise SessionError(f"{folder} holds no finished tuning session (no {CHOICE})",
                           "run skiptree tune ... --session DIR to the end first")  # fmt: skip
    choice = json.loads(path.read_text())
    if force:
        return choice
    if model_sha256 is not None and choice.get("model_sha256") not in (None, model_sha256):
        raise SessionError(
            f"session {folder} was tuned for another model ({choice.get('target')}, weights sha256 "
            f"{str(choice.get('model_sha256'))[:12]}...)",
            "tune this model in its own session, or pass --force to use the tree anyway",
        )
    if choice.get("fingerprint") != fingerprint:
        raise SessionError(
            f"session {folder} was tuned for device {choice.get('fingerprint')} "
            f"({choice.get('device', {}).get('cpu', '?')}), this machine is {fingerprint}",
            "run skiptree tune on this machine (measurements do not transfer between machines), "
            "or pass --force to use the tree anyway",
        )
    return choice
