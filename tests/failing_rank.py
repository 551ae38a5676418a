"""A training module that fails after launch as a run does: rank 0 prints its one error line and
exits 1, the other ranks exit 0. Tests launch it (``INRANK_TRAIN_MODULE=tests.failing_rank``)
through the launch scripts to see what follows that line on the console."""

import os
import sys

LINE = "error: rank 0 failed after launch (tests.failing_rank)"

if __name__ == "__main__":
    rank = next(
        (
            int(os.environ[v])
            for v in ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")
            if v in os.environ
        ),
        0,
    )
    if rank == 0:
        print(LINE, file=sys.stderr, flush=True)
    sys.exit(1 if rank == 0 else 0)
