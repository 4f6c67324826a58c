"""What a person typed, checked before a command runs: a missing file or an unknown shipped
name gets a "did you mean" (``run hoper`` → hopper), a run directory is not taken for a policy,
and a budget given in percent is caught as the usage error it is."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path

from compressor.core.errors import EXIT_USAGE, CompressorError

#: files that, beside ``config.json``, mark a folder as a ``compress run`` directory
RUN_DIR_MARKERS = ("journal.jsonl", "report.json", "timings.json", "run.lock", "candidates")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean X?"`` for the choice closest to ``word`` (empty when none is close).

    :param word: what was typed. :param choices: what exists.
    """
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _close_file(path: Path) -> str:
    """A "did you mean" for a missing path: the closest name in its (existing) folder."""
    folder = path.parent
    if not folder.is_dir() or not path.name:
        return ""
    names = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f"; did you mean {folder / close[0]}?" if close else ""


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a ``compress run`` directory (its config and a run's files)."""
    return (path / "config.json").is_file() and any((path / m).exists() for m in RUN_DIR_MARKERS)


def _refuse_run_dir(path: Path) -> None:
    if is_run_dir(path):
        raise CompressorError(
            f"{path} is a run directory, not a policy: its chosen policy is {path / 'policy.pt'}; "
            "to resume the run, repeat the command that started it"
        )


def _with_policy() -> list[str]:
    """Shipped profiles that come with a reference policy (valid as a source)."""
    from compressor.api import resolve_source
    from compressor.core.config import list_shipped

    names = []
    for name in list_shipped("profiles"):
        try:
            resolve_source(name)
        except CompressorError:
            continue
        names.append(name)
    return names


def check_source(src: str, folders: bool = False) -> str:
    """``src`` if it names an existing file (or folder, with ``folders``) or a shipped profile
    with a policy.

    :param src: a policy file, a shipped profile name, or (batch) a folder of policies.
    :param folders: accept a folder of policies (``compress run``'s batch).
    :raises CompressorError: missing (with the closest file or profile name), or a run
        directory.
    """
    p = Path(src)
    if p.is_dir():
        _refuse_run_dir(p)
        if folders:
            runs = [d.parent for d in p.rglob("config.json") if is_run_dir(d.parent)]
            if runs:
                raise CompressorError(
                    f"{src} holds run directories ({runs[0]}): pass the folder of the "
                    "policies, not of the runs"
                )
        return src
    if p.exists():
        return src
    from compressor.core.config import list_shipped

    if src in list_shipped("profiles"):
        return src  # resolve_source says it if its policy is missing
    hint = _close_file(p) if ("/" in src or p.suffix) else did_you_mean(src, _with_policy())
    hint = hint or _close_file(p)
    raise CompressorError(f"{src}: file not found (nor a shipped profile with a policy){hint}")


def check_sources(sources: Sequence[str]) -> list[str]:
    """:func:`check_source` for each of ``compress run``'s sources (folders allowed)."""
    return [check_source(s, folders=True) for s in sources]


def check_shipped(kind: str, value: str | None) -> str | None:
    """``value`` if it is a shipped ``kind`` (``profile`` or ``target``) or an existing file.

    :raises CompressorError: neither (with the closest name).
    """
    if value is None:
        return None
    from compressor.core.config import list_shipped

    p = Path(value)
    if p.suffix == ".toml" or p.exists() or "/" in value:
        if not p.is_file():
            raise CompressorError(f"{kind} file {p} not found{_close_file(p)}")
        return value
    names = list_shipped(f"{kind}s")
    if value not in names:
        raise CompressorError(
            f"unknown {kind} {value!r}{did_you_mean(value, names)} (shipped: {', '.join(names)})"
        )
    return value


def check_budget(budget: float) -> float:
    """``budget`` if it is a fraction in (0, 1); a percentage gets the fraction it meant.

    :raises CompressorError: out of range (a usage error: exit 2).
    """
    if 0.0 < budget < 1.0:
        return budget
    hint = f"; did you mean --budget {budget / 100:g} ({budget:g}%)?" if 1 <= budget < 100 else ""
    raise CompressorError(
        f"--budget is a fraction in (0, 1) of the return scale, e.g. 0.05 for 5%, got "
        f"{budget:g}{hint}",
        exit_code=EXIT_USAGE,
    )


def check_path(path: Path, what: str, suffix: str = "") -> Path:
    """``path`` if it is an existing file.

    :param what: what the file is, for messages ("ONNX model"). :param suffix: its suffix
        (a folder's message names such a file in it).
    :raises CompressorError: missing (with the closest name), or a folder.
    """
    if path.is_dir():
        inside = sorted(path.glob(f"*{suffix}")) if suffix else []
        example = f" (it holds {inside[0]})" if inside else ""
        raise CompressorError(f"{path} is a folder; pass the {what} file{example}")
    if not path.exists():
        missing = "not found" if what.endswith("directory") else "file not found"
        raise CompressorError(f"{path}: {missing}{_close_file(path)}")
    return path
