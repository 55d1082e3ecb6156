"""Will a config fit its GPUs, and which role bounds its step? Every role's memory per GPU and share of a
training step, predicted before anything starts (pipeline/capacity.py says how).

    python jobs/plan.py --config configs/wan_1_3b_framewise.yaml [--cluster cluster.yaml] [overrides ...]

Each role's GPU is the one its node type in the cluster file declares (the instance type of the node
type offering the role's custom resource). Prints the table; a role that does not fit its GPU is one
line on stderr and exit 2. `jobs/distill.py --dry-run` prints the same table last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.cli import parse  # noqa: E402


def extra_args(parser: argparse.ArgumentParser) -> None:
    from pipeline.capacity import CLUSTER_FILE

    parser.add_argument("--cluster", default=str(CLUSTER_FILE), help="the Ray cluster launcher file (node types)")


def main(argv: list[str] | None = None) -> int:
    from pipeline.capacity import report

    cfg, args = parse(__doc__, argv, extra=extra_args)
    table, refusals = report(cfg, args.cluster)
    print(table)
    for line in refusals:
        print(f"error: {line}", file=sys.stderr)
    return 2 if refusals else 0


if __name__ == "__main__":
    sys.exit(main())
