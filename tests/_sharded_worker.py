"""Run ``dam-mergekit calibrate`` under torchrun, optionally dying right after a checkpoint.

``python -m torch.distributed.run --nproc-per-node 2 tests/_sharded_worker.py RECIPE [STOP]``:
with STOP, every process exits after writing its checkpoint of step STOP, as a crash would.
"""

from __future__ import annotations

import sys

from dam_mergekit.calibrate.trainer import Calibrator
from dam_mergekit.cli import main

if __name__ == "__main__":
    recipe, *rest = sys.argv[1:]
    if rest:
        stop = int(rest[0])
        save = Calibrator.save_checkpoint

        def save_then_die(self, step, key, history):
            save(self, step, key, history)
            if step == stop:
                raise SystemExit(3)

        Calibrator.save_checkpoint = save_then_die
    sys.exit(main(["calibrate", recipe, "--no-progress"]))
