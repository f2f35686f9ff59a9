"""Where a run's wall time went: the `timeline` of result.json, a trial's timeline.json and
best.json, and its one-line summary. No Ray, no torch.

    python -m pytest -q tests/test_timeline.py

At GPU speed the waiting, not the training, decides how long a job takes. The driver times
what it does itself with a `Clock` (checks before Ray, Ray's start, the final evaluation,
Ray's shutdown); the workers' share comes from the run folder: every metrics.jsonl row times
its epoch (training, validation, the time the loop was blocked by checkpoint reports) and
rank 0 records each worker-group start in worker_starts.json (when it started, loading the
data, building the model; at a clean end the last report). `other` is
the wall minus every measured part, so the parts add up to the wall. Field by field: runs.py.
"""

from __future__ import annotations

import time

# A run's parts, in the order they happen.
RUN_PARTS = ("preflight", "ray_start", "worker_start", "data_load", "model_setup",
             "feature_cache", "phase1_training", "phase2_training", "validation", "checkpoints",
             "restarts", "final_evaluation", "shutdown", "other")
# A sweep's (best.json): its phase-1 run and the trials (running side by side) as a whole.
SWEEP_PARTS = ("preflight", "ray_start", "phase1", "trials", "final_evaluation", "shutdown",
               "other")
LABELS = {"preflight": "preflight checks", "ray_start": "Ray start",
          "worker_start": "worker start", "data_load": "data load", "model_setup": "model setup",
          "feature_cache": "feature caching", "phase1_training": "phase 1 training",
          "phase2_training": "phase 2 training", "validation": "validation",
          "checkpoints": "blocked on checkpoints",
          "restarts": "restarts", "final_evaluation": "final evaluation",
          "shutdown": "shutdown", "phase1": "phase 1 run", "trials": "trials", "other": "other"}
SHOWN_FROM_S = 0.5  # the one-line summary leaves out parts below this


class Clock:
    """The driver's side of a timeline: `lap(name)` charges the time since the previous lap
    to `name` (a name that is not a part, such as "fit", ends up in `other` as far as the
    workers' parts do not explain it); `add` puts in the workers' parts."""

    def __init__(self, now=time.monotonic):
        self.now = now
        self.t0 = self.last = now()
        self.laps: dict[str, float] = {}
        self.workers: dict[str, float] = {}
        self.restarts = 0

    def lap(self, name: str) -> float:
        t = self.now()
        seconds, self.last = t - self.last, t
        self.laps[name] = self.laps.get(name, 0.0) + seconds
        return seconds

    def add(self, parts: dict[str, float], restarts: int = 0) -> None:
        for k, v in parts.items():
            self.workers[k] = self.workers.get(k, 0.0) + v
        self.restarts += restarts

    def wall(self) -> float:
        """From the clock's start to its last lap."""
        return self.last - self.t0

    def timeline(self, parts: tuple[str, ...] = RUN_PARTS) -> dict:
        return build(self.wall(), {k: self.laps.get(k, 0.0) + self.workers.get(k, 0.0)
                                   for k in parts if k != "other"}, self.restarts, parts)


def build(wall: float, measured: dict[str, float], restarts: int = 0,
          parts: tuple[str, ...] = RUN_PARTS) -> dict:
    """{"wall_seconds", "seconds": {part: s} in `parts`' order, "restarts": count}: every
    part present, none below 0 (a clock skew between nodes can make a difference negative),
    `other` the wall minus the rest (0 if they overrun it)."""
    seconds = {k: round(max(0.0, measured.get(k, 0.0)), 2) for k in parts if k != "other"}
    seconds["other"] = round(max(0.0, wall - sum(seconds.values())), 2)
    return {"wall_seconds": round(wall, 2), "seconds": {k: seconds[k] for k in parts},
            "restarts": restarts}


def worker_parts(rows: list[dict], starts: list[dict], fit_start: float
                 ) -> tuple[dict[str, float], int]:
    """The parts of one TorchTrainer.fit (begun at Unix time `fit_start`) that the workers
    measured: `starts` are its worker-group starts (worker_starts.json entries, oldest first;
    earlier jobs' left out), `rows` the run's metrics rows (an epoch belongs to this fit if it
    ended after its first start, so a resumed run's earlier epochs are not counted again).
    Returns the parts and the number of restarts. A restart's loss is the time from the end
    of the failed group's last epoch (or of its setup, without one: its report, any partial
    epoch, the failure's detection and the new placement) to the next group's start."""
    if not starts:
        return {}, 0
    t = [s["started"] for s in starts]
    mine = [r for r in rows if r.get("finished_at", float("-inf")) >= t[0]]
    out = {"worker_start": t[0] - fit_start,
           "data_load": sum(s.get("data_load_seconds", 0.0) for s in starts),
           "model_setup": sum(s.get("model_setup_seconds", 0.0) for s in starts),
           "feature_cache": sum(r.get("feature_cache_seconds", 0.0) for r in mine),
           "validation": sum(r.get("eval_seconds", 0.0) for r in mine),
           "checkpoints": (sum(r.get("checkpoint_seconds", 0.0) for r in mine)
                           + sum(s.get("final_report_seconds", 0.0) for s in starts)),
           "restarts": 0.0}
    for phase in (1, 2):
        out[f"phase{phase}_training"] = sum(r.get("train_seconds", 0.0) for r in mine
                                            if r["phase"] == phase)
    for prev, start in zip(starts[:-1], t[1:], strict=True):
        useful = prev["started"] + prev.get("data_load_seconds", 0.0) + prev.get(
            "model_setup_seconds", 0.0)
        ended = [r["finished_at"] for r in mine if prev["started"] <= r["finished_at"] < start]
        out["restarts"] += max(0.0, start - max([useful, *ended]))
    return {k: max(0.0, v) for k, v in out.items()}, len(starts) - 1


def _s(v: float) -> str:
    return f"{v:.0f}" if v >= 9.5 else f"{v:.1f}"


def line(tl: dict) -> str:
    """One line, largest part first, parts under SHOWN_FROM_S left out:
    `wall 131 s: 50 s phase 2 training, 12 s Ray start, 9 s blocked on checkpoints, ...`."""
    shown = sorted(((v, k) for k, v in tl["seconds"].items() if v >= SHOWN_FROM_S),
                   key=lambda vk: -vk[0])  # stable: equal parts keep the order they happen in
    words = []
    for v, k in shown:
        if k == "restarts":
            n = tl.get("restarts", 0)
            words.append(f"{_s(v)} s lost to {n} restart{'' if n == 1 else 's'}")
        else:
            words.append(f"{_s(v)} s {LABELS.get(k, k)}")
    head = f"wall {tl['wall_seconds']:.0f} s"
    return f"{head}: {', '.join(words)}" if words else head
