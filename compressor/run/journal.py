"""The run directory's journal: every finished candidate, so a killed run resumes where it stopped.

A candidate's policy is written (atomically) to ``candidates/`` before its line is appended to
``journal.jsonl``; a line is therefore only ever present for a candidate whose weights are on
disk, and a line cut short by a kill is ignored. With several workers the journal may also hold
levels a wider search round finished but the search did not visit; they are reused, if needed,
on resume, and never reported. A run directory belongs to one configuration:
re-running the same command resumes it, a changed configuration is refused, never mixed in.
A line is appended whole or not at all (a full disk cuts nothing in half: see
:func:`compressor.core.atomic.append_line`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from compressor.core import atomic
from compressor.core.errors import CompressorError
from compressor.policy.native import load_native, save_policy
from compressor.run.lock import LOCK_FILE
from compressor.search.candidate import Candidate

CONFIG_FILE = "config.json"
JOURNAL_FILE = "journal.jsonl"


def config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a run configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else k)
    return f"{where or 'config'} ({a!r} → {b!r})"


def open_run_dir(root: Path, name: str, config: dict[str, Any]) -> tuple[Path, bool]:
    """Create ``root/name`` for ``config``, or reopen it to resume the same configuration.

    :returns: the directory and whether an earlier run of the same configuration is resumed.
    :raises CompressorError: the folder holds a run of another configuration, or other files.
    """
    run_dir = root / name
    cfg_path = run_dir / CONFIG_FILE
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise CompressorError(
                f"{cfg_path} is unreadable: remove {run_dir} or pick --name"
            ) from None
        if old.get("digest") != config_digest(config):
            diff = _first_difference(old.get("config", {}), config)
            raise CompressorError(
                f"{run_dir} holds a run with another configuration ({diff}); "
                "pass --name for a new run or remove the folder"
            )
        return run_dir, True
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise CompressorError(f"{run_dir} exists and is not a run directory; pick another --name")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(cfg_path, {"digest": config_digest(config), "config": config})
    return run_dir, False


def _key(sparsity: float) -> str:
    return f"{sparsity:.4f}"


class Journal:
    """Finished candidates of one run directory.

    :param run_dir: the run directory.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / JOURNAL_FILE
        self.policies = run_dir / "candidates"

    def _entries(self) -> dict[str, dict[str, Any]]:
        """The journal's whole lines whose policy is on disk, by target sparsity key."""
        done: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return done
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that candidate is simply redone
            key = _key(entry["target_sparsity"])
            if (self.policies / f"sparsity-{key}.pt").is_file():
                done[key] = entry
        return done

    def load(self) -> dict[str, Candidate]:
        """Candidates already finished, by target sparsity key, with their policies."""
        policy = self.policies
        return {
            key: Candidate.from_dict(entry, load_native(policy / f"sparsity-{key}.pt").eval())
            for key, entry in self._entries().items()
        }

    def count(self) -> int:
        """How many finished candidates the journal holds (nothing is loaded)."""
        return len(self._entries())

    def record(self, cand: Candidate) -> None:
        """Save the candidate's policy, then append its line (fsynced, whole or not at all).

        :raises compressor.core.atomic.WriteError: the storage refused either write.
        """
        key = _key(cand.target_sparsity)
        if cand.policy is not None:
            save_policy(cand.policy, self.policies / f"sparsity-{key}.pt")
        atomic.append_line(self.path, json.dumps(cand.to_dict()))

    @staticmethod
    def key(sparsity: float) -> str:
        """The journal key of a target sparsity."""
        return _key(sparsity)
