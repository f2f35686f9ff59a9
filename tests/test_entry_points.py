"""The ways in: `python -m cifar_ray` and the jobs/*.py entry points, asked for --help only
(no Ray starts, each takes well under a second).

    python -m pytest -q tests/test_entry_points.py
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("prepare-data", "train", "tune", "inspect", "evaluate", "export", "predict")
ENTRY_POINTS = sorted(p.name for p in (REPO / "jobs").glob("*.py"))


def run(*args: str) -> subprocess.CompletedProcess:
    # cwd=REPO: this checkout's cifar_ray comes first on sys.path, before any installed copy.
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_python_m_cifar_ray_lists_every_subcommand_as_the_console_script_does():
    done = run("-m", "cifar_ray", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: cifar-ray "), done.stdout
    # argparse lists the subcommands as {a,b,...} in the usage line.
    listed = set(re.search(r"\{([\w,-]+)\}", done.stdout).group(1).split(","))
    missing = sorted(set(SUBCOMMANDS) - listed)
    assert not missing, f"not in `python -m cifar_ray --help`: {missing}\n{done.stdout}"
    for command in SUBCOMMANDS:  # and each on a line of its own, with its help
        assert re.search(rf"^\s+{command}\s+\w", done.stdout, re.M), command


def test_python_m_cifar_ray_exits_with_the_status_cli_main_returns(tmp_path):
    # `inspect` of an empty folder: main() prints one line and returns 2 (no Ray imported).
    done = run("-m", "cifar_ray", "inspect", str(tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("cifar-ray inspect: error: "), done.stderr


def test_every_script_in_jobs_is_a_thin_entry_point_into_the_cli():
    # Benchmarks and experiments live in jobs/experiments/, not beside the entry points.
    assert {"train.py", "tune.py", "prepare_data.py", "inspect_results.py"} <= set(ENTRY_POINTS)
    for script in ENTRY_POINTS:
        text = (REPO / "jobs" / script).read_text()
        assert "from cifar_ray.cli import main" in text, script
        assert len(text.splitlines()) < 40, f"jobs/{script}: an experiment? jobs/experiments/"


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_each_entry_point_in_jobs_prints_its_help_and_exits_0(script):
    done = run(f"jobs/{script}", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: "), done.stdout
