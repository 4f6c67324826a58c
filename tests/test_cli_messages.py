"""The command line as a new user meets it: --version and -h, help that shows flags without
values, one-line errors with a "did you mean", a percent budget caught as a usage error, run
directories not taken for policies, readable bench and inspect output, lines never wrapped when
stdout is not a terminal, episode defaults from the profile, and progress detail per candidate.

Commands run in this process (``compressor.cli.app.main``): the same code path as the console
script, without a Python start-up per message."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, cli, make_policy

CARTPOLE = str(REPO / "profiles" / "cartpole.pt")
GOLDEN = REPO / "tests" / "data" / "golden_cartpole_report.json"


def one_error(err: str) -> str:
    """The single ``error:`` line of ``err`` (and nothing else on stderr)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_version_and_short_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "--version")
    assert code == 0 and re.fullmatch(r"compress \d+\.\d+\.\d+\S*\n", out)
    code, out, _ = cli(capsys, "-h")  # (in this process the program is named after pytest)
    assert code == 0 and "compress [OPTIONS] COMMAND [ARGS]..." in out
    code, out, _ = cli(capsys, "run", "-h")
    assert code == 0 and "compress run [OPTIONS] SRC..." in out


COMMANDS = ["run", "report", "compare", "evaluate", "attack", "certify", "prune", "export"]
COMMANDS += ["bench", "quantize", "inspect", "import", "train"]


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_shows_flags_without_values_and_arguments_in_capitals(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, *([command] if command else []), "--help")
    assert code == 0
    assert "<bool>" not in out  # --json, --help, --version take no value
    usage = next(line for line in out.splitlines() if "Usage:" in line)
    assert "{" not in usage and not re.search(r"\b[a-z_]+\.\.\.", usage), usage
    for flag in ("--help", "--json"):
        row = next((line for line in out.splitlines() if f"{flag} " in line), None)
        if row is not None:
            assert "<" not in row.split(flag, 1)[1].split("  ")[0]


@pytest.mark.parametrize(
    "budget, hint",
    [("5", "did you mean --budget 0.05 (5%)?"), ("1.5", "did you mean --budget 0.015"), ("0", "")],
)
def test_a_budget_out_of_range_is_a_usage_error(
    budget: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "run", CARTPOLE, "--budget", budget)
    line = one_error(err)
    assert code == 2 and "--budget is a fraction in (0, 1)" in line and hint in line
    assert "did you mean" in line if hint else "did you mean" not in line


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["run", "hoper"], "did you mean hopper?"),
        (["evaluate", "cartpol"], "did you mean cartpole?"),
        (["run", str(REPO / "profiles" / "hoper.pt")], f"did you mean {REPO}/profiles/hopper.pt?"),
        (["run", CARTPOLE, "--profile", "hoper"], "did you mean hopper?"),
        (["run", CARTPOLE, "--target", "cpu-x68"], "did you mean cpu-x86?"),
        (["export", CARTPOLE, "-o", "x.onnx", "--target", "cuda2"], "did you mean cuda?"),
        (["bench", str(REPO / "profiles" / "cartpole.onx")], "did you mean"),
        (["report", str(REPO / "profile")], f"did you mean {REPO}/profiles?"),
    ],
)
def test_typos_get_a_did_you_mean(
    argv: list[str], hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, *argv)
    line = one_error(err)
    assert code == 3 and hint in line, line


def test_a_name_close_to_nothing_gets_no_guess(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "run", "zzzzqqq")
    line = one_error(err)
    assert code == 3 and "file not found" in line and "did you mean" not in line


def _fake_run_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "journal.jsonl").write_text("")
    shutil.copy(CARTPOLE, path / "policy.pt")
    return path


def test_a_run_directory_is_not_a_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _fake_run_dir(tmp_path / "runs" / "hopper")
    code, _, err = cli(capsys, "run", str(run))
    assert code == 3
    assert one_error(err) == (
        f"error: {run} is a run directory, not a policy: its chosen policy is "
        f"{run}/policy.pt; to resume the run, repeat the command that started it"
    )
    code, _, err = cli(capsys, "run", str(tmp_path / "runs"))
    assert code == 3 and "holds run directories" in one_error(err)


def test_report_and_compare_accept_the_report_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import compressor.report.build as build

    report = json.loads(GOLDEN.read_text())
    report["source"]["file"] = "cartpole.pt"  # the stored copy leaves out paths
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(report))
    rendered: list[Path] = []
    # the stored copy also leaves out times, which rendering needs: record the call only
    monkeypatch.setattr(build, "rerender", lambda run_dir: rendered.append(run_dir) or {})
    monkeypatch.setattr(build, "validate", lambda r: [])
    code, out, err = cli(capsys, "report", str(tmp_path / "a" / "report.json"))
    assert code == 0 and rendered == [tmp_path / "a"], err
    assert f"wrote {tmp_path / 'a' / 'report.md'}" in out
    code, out, err = cli(
        capsys, "compare", str(tmp_path / "a" / "report.json"), str(tmp_path / "b"), "--json"
    )
    assert code == 0, err
    assert json.loads(out)["rows"]
    code, _, err = cli(capsys, "report", str(tmp_path / "c" / "report.json"))
    assert code == 3 and one_error(err).endswith("report.json: not found")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from compressor.deploy.export import export_onnx
    from compressor.policy.native import save_policy

    folder = tmp_path_factory.mktemp("bench")
    policy = make_policy(env_id="Pendulum-v1", obs_dim=3, act_dim=1).eval()
    save_policy(policy, folder / "p.pt")
    export_onnx(policy, folder / "policy.onnx")
    return folder / "policy.onnx", folder / "p.pt"


def test_bench_errors_are_one_line_without_exception_names(
    exported: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, _ = exported
    for target, expected in [
        (CARTPOLE, "not a readable ONNX model (the file is not an ONNX graph)"),
        (str(model.parent), f"is a folder; pass the ONNX model file (it holds {model})"),
        (str(model.with_name("policy.onx")), f"did you mean {model}?"),
    ]:
        code, _, err = cli(capsys, "bench", target, "--iters", "5", "--warmup", "0")
        line = one_error(err)
        assert code == 3 and expected in line
        assert not re.search(r"\(\w*(Error|Exception)\)", line), line


def test_bench_says_which_is_faster_and_keeps_its_footer_lines_whole(
    exported: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, policy = exported
    code, out, err = cli(
        capsys, "bench", str(model), "--policy", str(policy), "--iters", "20", "--warmup", "2"
    )
    assert code == 0, err
    assert "÷" not in out and "onnxruntime vs torch" in out
    row = next(line for line in out.splitlines() if line.startswith("│ 1 "))
    assert re.search(r"\d+(\.\d)?× (faster|slower)|as fast", row), row
    lines = out.splitlines()
    assert any(re.fullmatch(rf"model: {re.escape(str(model))}, \d+ bytes", x) for x in lines)
    assert any(
        x.startswith("parameters: ") and x.endswith("weights stored fp32/fp32/fp32") for x in lines
    )
    assert any(x.startswith("target: cpu-x86, providers used ") for x in lines)


def test_inspect_shows_fields_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "inspect", "cartpole")
    assert code == 0, err
    assert '{"' not in out and "[4, 64" not in out  # no JSON blob, no Python list
    rows = {}  # label (indented by depth) → value, read off the table's cells
    for line in out.splitlines():
        cells = line.split("│")[1:-1]
        if len(cells) == 2:
            rows[cells[0][1:].rstrip()] = cells[1].strip()
    assert rows["normalisation"] == "" and rows["  enabled"] == "yes"
    assert rows["layer_sizes"] == "4, 64, 64, 2"
    # the training provenance the file records, as fields; its command as one would type it
    assert rows["    command"].startswith("compress train CartPole-v1 -o ")
    # stdout is not a terminal here: nothing is cut to 80 columns (the full SHA-256 is shown)
    assert re.fullmatch(r"[0-9a-f]{64}", rows["sha256"])


def test_consoles_do_not_wrap_when_not_a_terminal() -> None:
    from compressor.cli.common import err, out, reporter

    for console in (out, err, reporter().console):
        assert not console.is_terminal and console.soft_wrap and console.width > 1000


TINY = """
name = "tiny-eval"
[env]
id = "CartPole-v1"
kwargs = {max_episode_steps = 30}
[evaluation]
episodes = 3
num_envs = 3
"""


def test_episode_defaults_come_from_the_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prof = tmp_path / "p.toml"
    prof.write_text(TINY)
    code, out, err = cli(capsys, "evaluate", CARTPOLE, "--profile", str(prof), "--json")
    assert code == 0, err
    assert json.loads(out)["return"]["n"] == 3
    argv = ["attack", CARTPOLE, "--profile", str(prof), "--attack", "random", "--workers", "1"]
    code, out, err = cli(capsys, *argv, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert all(r["return"]["n"] == 3 for r in [data["clean"], *data["attacks"].values()])
    code, out, _ = cli(capsys, "evaluate", "--help")
    assert "default: the profile's" in out


def test_a_round_of_candidates_shows_what_each_is_doing() -> None:
    from compressor.run.ledger import _Board

    shown: list[tuple[int, int | None, str]] = []

    def progress(done: int, total: int | None = None, detail: str = "") -> None:
        shown.append((done, total, detail))

    board = _Board([0.5, 0.7], 4, progress)
    board.update(0, 0, 4, "pruning and fine-tuning")
    board.update(1, 2, 4, "mad episode 2/3")
    board.finished(0)
    assert shown == [
        (0, 8, "50.0% pruning and fine-tuning · 70.0% waiting"),
        (2, 8, "50.0% pruning and fine-tuning · 70.0% mad episode 2/3"),
        (6, 8, "50.0% built · 70.0% mad episode 2/3"),
    ]


def test_a_suite_reports_each_episode_without_changing_a_number() -> None:
    from compressor.core.threat import ThreatModel
    from compressor.evaluate import evaluate_suite
    from compressor.policy.loading import load_policy

    policy = load_policy(CARTPOLE).policy.eval()
    details: list[str] = []

    def progress(done: int, total: int | None = None, detail: str = "") -> None:
        details.append(detail)

    def run(**kw: Any) -> Any:
        suite = evaluate_suite(
            policy,
            "CartPole-v1",
            {"max_episode_steps": 30},
            [0, 1],
            ["random"],
            ThreatModel(0.1, "inf", "normalized"),
            num_envs=2,
            **kw,
        )
        return [(r.stats.mean, r.steps) for r in (suite.clean, *suite.attacks.values())]

    assert run(progress=progress) == run()
    assert "clean episode 1/2" in details and "random episode 2/2" in details
