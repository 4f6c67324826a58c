"""Batch mode of ``compress run``: many policies, one run directory each, one summary.

Sources are policy files, shipped profile names, or directories (searched recursively for
policy files). A policy that fails with a :class:`CompressorError` (a bad file, a wrong env)
is recorded as an error row and the batch goes on; the summary is written atomically to
``<out>/batch-summary.json`` after every policy, so a killed batch keeps what it finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from compressor.core import atomic
from compressor.core.errors import CompressorError

#: file suffixes taken from a directory (SB3 zips, native/CleanRL torch files)
POLICY_SUFFIXES = (".pt", ".zip", ".pth", ".cleanrl_model")
SUMMARY_FILE = "batch-summary.json"


@dataclass
class BatchRow:
    """One policy's outcome in a batch.

    :param source: the policy file. :param run_name: its run directory's name.
    :param status: ``pass``, ``fail`` (budget not met), ``undecided`` (too close to call
        within the episodes allowed) or ``error``.
    :param error: the one-line error (status ``error``).
    """

    source: str
    run_name: str
    status: str
    env_id: str | None = None
    run_dir: str | None = None
    chosen_sparsity: float | None = None
    dense_clean: float | None = None
    chosen_clean: float | None = None
    dense_robust: float | None = None
    chosen_robust: float | None = None
    dense_lipschitz: float | None = None
    chosen_lipschitz: float | None = None
    onnx_bytes: int | None = None
    wall_s: float | None = None
    error: str | None = None


def expand_sources(sources: Sequence[str], resolve: Callable[[str], Path]) -> list[Path]:
    """Policy files named by ``sources``: files and profile names via ``resolve``, directories
    expanded to the policy files under them (sorted); duplicates dropped, order kept."""
    found: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            files = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in POLICY_SUFFIXES
            )
            if not files:
                raise CompressorError(
                    f"{src}: no policy files ({', '.join(POLICY_SUFFIXES)}) in this folder"
                )
            found += files
        else:
            found.append(resolve(src))
    return list(dict.fromkeys(found))


def run_names(paths: Sequence[Path]) -> list[str]:
    """A distinct run name per policy: its stem, prefixed by parent folders where stems clash
    (``model.zip`` files of several SB3 folders)."""
    names = [p.stem for p in paths]
    depth = 1
    while len(set(names)) < len(names) and depth < 8:
        names = [
            "-".join([*p.parent.parts[-depth:], p.stem]) if names.count(n) > 1 else n
            for p, n in zip(paths, names, strict=True)
        ]
        depth += 1
    if len(set(names)) < len(names):
        raise CompressorError("two sources give the same run name; run them separately")
    return names


def row_from_report(source: Path, name: str, report: dict[str, Any], run_dir: Path) -> BatchRow:
    """The summary row of a finished run."""
    dense, chosen = report["dense"], report.get("chosen") or {}
    norm = report["threat"]["norm"]
    verdict = report["verdict"]
    status = verdict.get("status") or ("pass" if verdict["passed"] else "fail")
    return BatchRow(
        source=str(source),
        run_name=name,
        status=status,
        env_id=report["source"].get("env_id"),
        run_dir=str(run_dir),
        chosen_sparsity=report["verdict"].get("chosen_sparsity"),
        dense_clean=dense["clean_return"],
        chosen_clean=chosen.get("clean_return"),
        dense_robust=dense["robust_return"],
        chosen_robust=chosen.get("robust_return"),
        dense_lipschitz=dense["certificates"][norm]["lipschitz"],
        chosen_lipschitz=(chosen.get("certificates") or {}).get(norm, {}).get("lipschitz"),
        onnx_bytes=(chosen.get("onnx") or {}).get("file_bytes"),
        wall_s=report.get("timings_s", {}).get("total"),
    )


def run_batch(
    paths: Sequence[Path],
    out_root: Path,
    run_one: Callable[[Path, str], tuple[dict[str, Any], Path]],
    on_row: Callable[[BatchRow], None] | None = None,
) -> list[BatchRow]:
    """Run ``run_one(path, name)`` for every policy and collect the summary.

    :param run_one: runs one policy, returns its report and run directory.
    :param on_row: called after each policy (progress display).
    """
    rows: list[BatchRow] = []
    for path, name in zip(paths, run_names(paths), strict=True):
        t0 = time.perf_counter()
        try:
            report, run_dir = run_one(path, name)
            row = row_from_report(path, name, report, run_dir)
        except CompressorError as exc:
            row = BatchRow(
                str(path), name, "error", error=str(exc), wall_s=time.perf_counter() - t0
            )
        rows.append(row)
        out_root.mkdir(parents=True, exist_ok=True)
        atomic.write_json(out_root / SUMMARY_FILE, {"runs": [asdict(r) for r in rows]})
        if on_row:
            on_row(row)
    return rows
