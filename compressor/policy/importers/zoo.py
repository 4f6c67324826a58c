"""The RL Baselines3 Zoo's folder layout around an SB3 zip, read as text.

A Zoo run keeps beside (or in ``<env>/`` below) the model: ``config.yml`` (hyperparameters:
``normalize``, ``env_wrapper``), ``args.yml`` (the command line: ``env``, ``env_kwargs``),
``env_kwargs.yml`` and ``vecnormalize.pkl`` (``vec_normalize.pkl`` on the Hugging Face hub). The
YAML files are read as text: no tag is honoured and nothing is constructed, so a file can name a
wrapper but never make us import it (see :mod:`compressor.rl.wrappers` for those we re-create).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.core.errors import CompressorError
from compressor.rl.wrappers import ALIASES, DEFAULTS, WRAPPERS

_ENV_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:/[A-Za-z0-9_]+)?-v\d+")
_STATS_NAMES = ("vecnormalize.pkl", "vec_normalize.pkl")
_NULL = ("null", "~", "none", "")


def read_zoo_yaml(path: Path) -> dict[str, str]:
    """Top-level scalars of an RL Zoo ``config.yml`` / ``args.yml``, as raw strings.

    The Zoo dumps an OrderedDict as a list of ``[key, value]`` pairs; plain ``key: value``
    files are read too. A value spread over several lines is joined with single spaces.

    :param path: the YAML file.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    out: dict[str, str] = {}
    pair = r"^(?:- |  )- - (\S+)\n    - (.*(?:\n      .*)*)"
    for m in re.finditer(pair, text, re.MULTILINE):
        out.setdefault(m.group(1), " ".join(m.group(2).split()))
    plain = r"^([A-Za-z_]\w*):[ \t]*((?:\S.*)?(?:\n[ \t]+\S.*)*)$"
    for m in re.finditer(plain, text, re.MULTILINE):
        if m.group(2).strip():
            out.setdefault(m.group(1), " ".join(m.group(2).split()))
    return out


def yaml_scalar(text: str) -> Any:
    """A YAML scalar as Python: int, float, bool, None or (unquoted) string.

    :param text: the scalar's text.
    :raises CompressorError: a tagged value (``!!python/...``): never constructed.
    """
    t = text.strip()
    if t.startswith("!"):
        raise CompressorError(
            f"refused the YAML tag in {t[:60]!r} (nothing was constructed); pass --env-kwargs"
        )
    if t.lower() in _NULL:
        return None
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    for kind in (int, float):
        try:
            return kind(t)
        except ValueError:
            pass
    return t


def zoo_dirs(path: Path, env_name: str | None) -> list[Path]:
    """The folders of a Zoo run that may hold its files: the zip's, and ``<env>/`` below it.

    :param path: the zip file.
    :param env_name: the env id it was trained on, if known.
    """
    dirs = [path.parent]
    for name in (env_name, path.stem):
        if name and (path.parent / name).is_dir():
            dirs.append(path.parent / name)
    return list(dict.fromkeys(dirs))


def find_env_id(path: Path) -> tuple[str | None, str]:
    """The env id an SB3 zip was trained on, from the RL Zoo layout or the file/folder names.

    :param path: the zip file.
    :returns: ``(env id or None, where it was found)``.
    """
    for d in zoo_dirs(path, None):
        env = read_zoo_yaml(d / "args.yml").get("env")
        if env:
            return env.strip("'\""), f"{d.name}/args.yml"
    for name in (path.stem, path.parent.name, path.parent.parent.name):
        for cand in _ENV_RE.findall(name):
            base = cand.rsplit("-v", 1)[0]
            if any(k.rsplit("-v", 1)[0] == base for k in _registry_ids()):
                return cand, f"name {name!r}"
    return None, ""


def _registry_ids() -> list[str]:
    import gymnasium as gym

    return list(gym.registry)


def find_vecnormalize(path: Path, env_name: str | None) -> Path | None:
    """``vecnormalize.pkl`` beside the zip or in the RL Zoo layout (``<dir>/<env>/``), if any.

    :param path: the zip file.
    :param env_name: the env id the zip was trained on (the Zoo's subfolder name).
    """
    for d in zoo_dirs(path, env_name):
        for name in _STATS_NAMES:
            if (d / name).is_file():
                return d / name
    return None


def _config(path: Path, env_name: str | None) -> tuple[dict[str, str], Path | None]:
    for d in zoo_dirs(path, env_name):
        if (d / "config.yml").is_file():
            return read_zoo_yaml(d / "config.yml"), d / "config.yml"
    return {}, None


def expects_normalize(path: Path, env_name: str | None) -> tuple[bool | None, str]:
    """Whether a Zoo config says the policy was trained with observation normalisation.

    :param path: the zip file.
    :param env_name: the env id it was trained on.
    :returns: ``(True/False, config path)``, or ``(None, "")`` without a config.
    """
    cfg, where = _config(path, env_name)
    if where is None:
        return None, ""
    value = cfg.get("normalize")
    if value is None or re.search(r"norm_obs['\"]?\s*[:=]\s*False", value):
        return False, str(where)
    return value.strip().lower() not in ("false", "0", "no", *_NULL), str(where)


def parse_env_wrapper(value: str, origin: str) -> list[dict[str, Any]]:
    """The ``env_wrapper`` entry of a Zoo config as ``PolicySpec.env_wrappers``.

    Accepts the Zoo's forms: one class path, a class path with keyword arguments, or a list of
    them (``- a.B: {k: v}``), all as :func:`read_zoo_yaml` joins them onto one line.

    :param value: the entry's text.
    :param origin: the config file, for messages.
    :raises CompressorError: a wrapper this tool does not re-create (it would change what the
        policy sees; nothing can be evaluated without it).
    """
    if value.strip().lower() in _NULL:
        return []
    names = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
    found = list(names.finditer(value))
    out: list[dict[str, Any]] = []
    for i, m in enumerate(found):
        rest = value[m.end() : found[i + 1].start() if i + 1 < len(found) else len(value)]
        name = ALIASES.get(m.group(0), m.group(0).rsplit(".", 1)[-1])
        if name not in WRAPPERS or m.group(0) not in ALIASES:
            raise CompressorError(
                f"{origin} trains behind env_wrapper {m.group(0)}, which this tool does not "
                f"re-create (supported: {', '.join(ALIASES)}); the policy cannot be evaluated "
                "without it"
            )
        entry: dict[str, Any] = {"name": name, **DEFAULTS.get(name, {})}
        for k, v in re.findall(r"(\w+)\s*:\s*([^\s,{}]+)", rest):
            entry[k] = yaml_scalar(v)
        out.append(entry)
    if not out:
        raise CompressorError(f"{origin}: cannot read its env_wrapper entry {value[:80]!r}")
    return out


def _kwargs_text(text: str, origin: str) -> dict[str, Any]:
    """``{}`` / ``dict(a=1)`` / ``{a: 1, b: x}`` / ``a: 1`` forms, scalar values only."""
    t = text.strip()
    if t.lower() in (*_NULL, "{}", "dict()"):
        return {}
    if t.startswith("dict(") and t.endswith(")"):
        pairs = re.findall(r"(\w+)\s*=\s*([^,()]+)", t[5:-1])
    else:
        pairs = re.findall(r"(\w+)\s*:\s*([^,{}]+)", t.strip("{}"))
    if not pairs:
        raise CompressorError(f"{origin}: cannot read env kwargs {t[:80]!r}; pass --env-kwargs")
    return {k: yaml_scalar(v) for k, v in pairs}


def read_env_kwargs(path: Path, env_name: str | None) -> tuple[dict[str, Any], str]:
    """The env kwargs a Zoo run was trained with: ``env_kwargs.yml``, else ``args.yml``'s.

    :param path: the zip file.
    :param env_name: the env id it was trained on.
    :returns: ``(kwargs, the file they came from or "")``.
    """
    for d in zoo_dirs(path, env_name):
        f = d / "env_kwargs.yml"
        if f.is_file():
            text = f.read_text(encoding="utf-8", errors="replace")
            lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
            return _kwargs_text(", ".join(lines), str(f)), str(f)
        value = read_zoo_yaml(d / "args.yml").get("env_kwargs")
        if value is not None:
            return _kwargs_text(value, str(d / "args.yml")), str(d / "args.yml")
    return {}, ""


@dataclass
class ZooLayout:
    """What the RL Zoo files around a zip say.

    :param trained_env: the env id it was trained on, or None.
    :param env_source: where that was read.
    :param wrappers: ``config.yml``'s ``env_wrapper`` as ``PolicySpec.env_wrappers``.
    :param env_kwargs: the env kwargs of the run.
    :param env_kwargs_source: the file they came from.
    :param normalize: whether the config says it normalised observations (None: no config).
    :param config: the config file ("" when there is none).
    :param stats: its ``vecnormalize.pkl``, if found.
    """

    trained_env: str | None
    env_source: str
    wrappers: list[dict[str, Any]] = field(default_factory=list)
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    env_kwargs_source: str = ""
    normalize: bool | None = None
    config: str = ""
    stats: Path | None = None


def read_layout(path: Path) -> ZooLayout:
    """Everything the RL Zoo layout around ``path`` says.

    :param path: the zip file.
    """
    trained, env_source = find_env_id(path)
    cfg, where = _config(path, trained)
    wrappers = []
    if where is not None and "env_wrapper" in cfg:
        wrappers = parse_env_wrapper(cfg["env_wrapper"], str(where))
    kwargs, kwargs_source = read_env_kwargs(path, trained)
    normalize, config = expects_normalize(path, trained)
    return ZooLayout(
        trained_env=trained,
        env_source=env_source,
        wrappers=wrappers,
        env_kwargs=kwargs,
        env_kwargs_source=kwargs_source,
        normalize=normalize,
        config=config,
        stats=find_vecnormalize(path, trained),
    )
