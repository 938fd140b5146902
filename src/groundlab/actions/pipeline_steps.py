"""Steps of a multi-step action (action=autolabel), each with its own folder under the run dir, recorded in
`<run dir>/pipeline.json` so the same command resumes a stopped pipeline where it stopped.

pipeline.json: {"steps": {name: {"status": "complete", "inputs", "outputs" (name -> path), "metrics",
"seconds", "finished" (unix time)}}, "order": [names as run]}; written atomically after every step.

A step is skipped when its record is complete, its outputs all exist and its inputs are the same as the record's.
Inputs include the `finished` time of the steps it reads from, so a step that ran again makes every step after
it run again. A complete step whose inputs changed runs again in a fresh folder: the old one is kept, renamed
with its finish time (`mal_train.20261128-101500`), nothing lost. A step that was stopped midway (no complete record)
runs again in its own folder, where a training step resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

from groundlab.ops.atomic_write import atomic_write_text

log = logging.getLogger(__name__)

StepResult = Dict[str, Dict[str, Any]]  # {"outputs": {name: path}, "metrics": {name: value}}


def _normal(value: Any) -> Any:
    """`value` as json would give it back (tuples as lists, keys as str), so records compare equal on resume."""
    return json.loads(json.dumps(value, default=str))


class Pipeline:
    """pipe = Pipeline(run_dir); record = pipe.step(name, inputs, fn, after=[earlier records]).

    fn(folder) runs the step in `folder` (under run_dir; the step creates it if it writes anything) and returns
    {"outputs", "metrics"}."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "pipeline.json")
        self.steps: Dict[str, Dict[str, Any]] = {}
        self.order: List[str] = []
        if os.path.isfile(self.path):
            with open(self.path) as f:
                self.steps = json.load(f).get("steps", {})

    def folder(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def _write(self) -> None:
        ordered = {n: self.steps[n] for n in self.order if n in self.steps}
        atomic_write_text(self.path, json.dumps({"steps": ordered, "order": self.order}, indent=1))

    def _reusable(self, name: str, inputs: Dict[str, Any]) -> Optional[str]:
        """None when the recorded step can be reused, else why it runs."""
        old = self.steps.get(name)
        if not old:
            return "not run yet"
        if old.get("status") != "complete":
            return "stopped before it completed"
        changed = sorted(k for k in set(old.get("inputs", {})) | set(inputs)
                         if old.get("inputs", {}).get(k) != inputs.get(k))
        if changed:
            return f"its inputs changed ({', '.join(changed)})"
        gone = [p for p in old.get("outputs", {}).values() if isinstance(p, str) and not os.path.exists(p)]
        if gone:
            return f"its output {gone[0]} is missing"
        return None

    def step(self, name: str, inputs: Mapping[str, Any], fn: Callable[[str], StepResult],
             after: List[Mapping[str, Any]] = ()) -> Dict[str, Any]:
        """Run step `name` (or reuse its record); returns its record {"status", "inputs", "outputs", "metrics",
        "seconds", "finished"}."""
        inputs = _normal({**inputs, **{f"{r['name']}_finished": r["finished"] for r in after}})
        self.order.append(name)
        why = self._reusable(name, inputs)
        if why is None:
            record = self.steps[name]
            log.info("step %s: complete (%s), skipped", name, self.folder(name))
            return record
        folder = self.folder(name)
        old = self.steps.get(name)
        if old and old.get("status") == "complete" and os.path.isdir(folder):
            kept = stamp = f"{folder}.{time.strftime('%Y%m%d-%H%M%S', time.localtime(old['finished']))}"
            n = 1
            while os.path.exists(kept):
                kept, n = f"{stamp}-{n}", n + 1
            os.replace(folder, kept)
            log.info("step %s: %s: runs again; its previous folder is kept as %s", name, why, kept)
        else:
            log.info("step %s: runs (%s) in %s", name, why, folder)
        self.steps[name] = {"name": name, "status": "running", "inputs": inputs}
        self._write()
        start = time.time()
        result = fn(folder)
        record = {"name": name, "status": "complete", "inputs": inputs,
                  "outputs": _normal(result.get("outputs", {})), "metrics": _normal(result.get("metrics", {})),
                  "seconds": round(time.time() - start, 1), "finished": time.time()}
        self.steps[name] = record
        self._write()
        log.info("step %s: complete in %.0f s", name, record["seconds"])
        return record
