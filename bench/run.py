"""`make bench` / `make bench-quick`: every benchmark, each printing `name: value` lines.

Full: results appended to BENCHMARKS.md. Quick (--quick): smaller jobs, no distilabel arm, nothing
recorded. Exits non-zero if a benchmark cannot run; never because of a number.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    record = [] if args.quick else ["--record"]
    runs = [
        ["pipeline.py", *(["--quick", "--no-distilabel"] if args.quick else []), *record],
        ["cdr.py", *(["--quick"] if args.quick else []), *record],
        ["judge.py", *(["--quick", "--parts", "throughput"] if args.quick else []), *record],
        ["scale.py", "--sizes", "10000,100000" if args.quick else "10000,100000,1000000", *record],
        ["engine.py", *(["--quick"] if args.quick else []), *record],
        ["faults.py", *(["--prompts", "40"] if args.quick else []), *record],
        ["replicas.py", *(["--calls", "300", "--prompts", "40"] if args.quick else []), *record],
    ]
    failed = []
    for script, *rest in runs:
        start = time.perf_counter()
        print(f"# {script} {' '.join(rest)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *rest]).returncode != 0:
            failed.append(script)
        print(f"# {script} took {time.perf_counter() - start:.0f} s", flush=True)
    if failed:
        print(f"benchmarks that could not run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
