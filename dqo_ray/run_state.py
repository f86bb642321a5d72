"""The pipeline's record of finished stages: run_dir/pipeline_state.json (pure, no Ray).

A stage ("round0/generate", "round1/train", ...) is recorded once it has finished, with what
it produced (checkpoint paths, counts, seconds) and which driver start ("attempt") finished
it. A re-started driver skips every recorded stage and re-enters the first unrecorded one;
that stage's own resume (stored prompts skipped, Ray Train's last checkpoint) keeps its
partial work. Every write replaces the file atomically, so a crash leaves the previous
complete record.

The file also holds a fingerprint of the configuration that shapes results: resuming with a
different one raises instead of silently mixing two experiments. `pipeline.rounds` is left
out so that a finished run can be extended with more rounds; `ray` (where it runs) and
`eval` (what is measured, not what is trained) and `compare` (which runs jobs/compare.py
makes) are left out too, and so is `grading` (how many processes grade, and a time limit that
only pathological math_verify comparisons reach). A setting added to the project after a run
began is no change while it keeps its default, so runs resume across upgrades.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from dqo_ray.config import Config, to_dict
from dqo_ray.io import atomic_write

STATE_FILE = "pipeline_state.json"
_NOT_FINGERPRINTED = ({"ray", "eval", "compare", "grading"},
                      {("pipeline", "rounds"), ("pipeline", "overlap")})


def config_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config (to_dict) a run's results depend on."""
    sections, keys = _NOT_FINGERPRINTED
    return {section: {k: v for k, v in values.items() if (section, k) not in keys}
            for section, values in config.items() if section not in sections}


_ABSENT = object()


def _diff(old: Any, new: Any, default: Any, path: str = "") -> list[str]:
    """Changed settings as "path: old -> new". A setting the saved record lacks (added to
    the project since the run began) counts only when its new value is not the default."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        defaults = default if isinstance(default, dict) else {}
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key, _ABSENT), new.get(key, _ABSENT),
                         defaults.get(key, _ABSENT), f"{path}.{key}" if path else key)
        return out
    if old is _ABSENT and new == default:
        return []
    if old == new:
        return []
    shown = [None if v is _ABSENT else v for v in (old, new)]
    return [f"{path}: {shown[0]!r} -> {shown[1]!r}"]


class StateError(ValueError):
    """The state file cannot be used for this run (unreadable, or another configuration)."""


class RunState:
    def __init__(self, run_dir: str | os.PathLike, config: dict[str, Any]) -> None:
        self.path = Path(run_dir) / STATE_FILE
        fingerprint = config_fingerprint(config)
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                stages, attempts, saved = data["stages"], data["attempts"], data["config"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise StateError(f"{self.path}: not a pipeline state file ({exc}); move it "
                                 "away to start the run over") from exc
            changed = _diff(saved, fingerprint, config_fingerprint(to_dict(Config())))
            if changed:
                raise StateError(
                    f"{self.path}: this run was started with another configuration "
                    f"({'; '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}). Resume "
                    "with the original settings, or choose a new run.name.")
        else:
            stages, attempts = {}, []
        self.stages: dict[str, dict[str, Any]] = stages
        self.attempts: list[float] = [*attempts, time.time()]
        self.attempt = len(self.attempts) - 1
        self.fingerprint = fingerprint
        self._lock = threading.Lock()  # the driver records stages from two threads (overlap)
        self._save()

    def finished(self, stage: str) -> dict[str, Any] | None:
        """The recorded result of `stage`, or None when it has not finished (a finished stage
        may have recorded an empty result: ask `done`, not the result's truth)."""
        record = self.stages.get(stage)
        return None if record is None else record["result"]

    def done(self, stage: str) -> bool:
        """Whether `stage` has finished (whatever result it recorded)."""
        return stage in self.stages

    def finish(self, stage: str, seconds: float, **result: Any) -> None:
        with self._lock:
            self.stages[stage] = {"attempt": self.attempt, "finished_at": time.time(),
                                  "seconds": round(seconds, 3), "result": result}
            self._save()

    def _save(self) -> None:
        atomic_write(self.path, json.dumps({"config": self.fingerprint,
                                            "attempts": self.attempts,
                                            "stages": self.stages}, indent=1, default=str),
                     what="the run's record of finished stages")
