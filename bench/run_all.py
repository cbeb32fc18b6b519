"""Run every benchmark in turn: `python -m bench.run_all [--quick]`.

Each script prints its table and writes `bench/results/<name>.json`; `--quick` uses
tiny models and short runs (about ten minutes in all on 2 cores; the CI smoke tests run its
parts) and writes under `bench/results/quick/`, never over the measured results.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ("protocol", "learner", "actor", "e2e", "staleness", "weights", "broker")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help="default: bench/results (bench/results/quick with --quick)")
    parser.add_argument("--only", nargs="+", choices=SUITE, default=list(SUITE))
    args = parser.parse_args()
    failed = []
    for name in args.only:
        print(f"\n=== bench.{name} ===", flush=True)
        started = time.time()
        cmd = [sys.executable, "-m", f"bench.{name}", *(["--out", str(args.out)] if args.out else []), *(["--quick"] if args.quick else [])]
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            failed.append(name)
        print(f"({time.time() - started:.0f} s)", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
