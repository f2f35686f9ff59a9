"""Our log lines: one `logging` logger per module under "cifar_ray", configured in one place.

    cifar-ray train --smoke --log-level DEBUG

The CLI calls `setup` once (--log-level); a Ray Train worker calls `setup_worker` with the
run's config's level, so a run's driver and workers say the same. Progress (INFO) is the
message alone, as a person reads it; anything louder names its level and module.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

ROOT = "cifar_ray"


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return line if record.levelno == logging.INFO else (
            f"{record.levelname} {record.name}: {line}")


def setup(level: str = "INFO", stream: TextIO | None = None, propagate: bool = True) -> None:
    """Send cifar_ray's records at `level` and above to `stream` (stderr by default)."""
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):  # idempotent: a second call replaces the first
        logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Format("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate


def setup_worker(rank: int, level: str) -> None:
    """A Ray Train worker: `level` on rank 0; the other ranks only warn, so that a
    run's progress shows once. sys.__stdout__, and no propagation to the root logger: Train V2
    gives workers root handlers and patches print to log and echo, which would show each line
    twice."""
    setup(level if rank == 0 else max(level, "WARNING", key=logging.getLevelName),
          sys.__stdout__, propagate=False)
