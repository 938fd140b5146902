"""`python tests/ddp_probe.py <run.py arguments>`: run.py itself, with every training sampler's draws recorded.

Each process (Lightning re-executes this script, sys.argv[0], for its other ranks) appends one JSON line per
training epoch to $DDP_PROBE_DIR/draws_<pid>.jsonl: {"rank", "world_size", "epoch", "indices"}, the dataset
indices ResumableSampler handed that rank. Nothing else changes, so the run is the real run.py run."""

from __future__ import annotations

import json
import os
from pathlib import Path

from groundlab.engine.resumable_sampler import ResumableSampler

_iter = ResumableSampler.__iter__


def _recording_iter(self):
    indices = list(_iter(self))
    if self.shuffle:  # training loaders only
        with open(Path(os.environ["DDP_PROBE_DIR"]) / f"draws_{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps({"rank": self.rank, "world_size": self.world_size, "epoch": self.epoch,
                                "indices": indices}) + "\n")
    return iter(indices)


ResumableSampler.__iter__ = _recording_iter
if os.environ.get("DDP_PROBE_STACKS"):  # diagnosis of a hang: every thread's stack after that many seconds
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ["DDP_PROBE_STACKS"]), exit=False)
# run.py's code in this module (not runpy, which sets sys.argv[0] to run.py): Lightning re-executes sys.argv[0],
# so its other ranks run this probe too; Hydra finds conf/ next to run.py from the code's file name
RUN_PY = str(Path(__file__).resolve().parents[1] / "run.py")
exec(compile(Path(RUN_PY).read_text(), RUN_PY, "exec"), {"__name__": "__main__", "__file__": RUN_PY})
