"""Inspect a finished (or unfinished) sweep from storage; no cluster needed.

    python jobs/inspect_results.py s3://bucket/sweeps/lr-sweep --plots reports/
    python jobs/inspect_results.py ./results/smoke-sweep --json

(Not named inspect.py: run as a script, that would shadow the standard library's inspect.)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, without an install

from cifar_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
