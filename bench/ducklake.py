"""Write throughput of the DuckLake warehouse on PostgreSQL against the single DuckDB file (issue 15, part 4).

The same bulk batches (half responses, half scores, built before the clock starts) go through
`Store.write_frames`: into a single file; into a DuckLake (a loopback PostgreSQL started here, Parquet in a
local folder) by one process; and by two processes at once, each writing its own half of the batches (the
write gate serializes their commits: a conflict makes a batch run again). Last, the first half is written
again into the lake: every row exists, so the anti-join skips them all. Rows/s count rows added.

    python bench/ducklake.py [--rows 200000] [--batch 10000] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl  # noqa: E402
from bench.common import append_results, frame_batches  # noqa: E402

from prefsynth.warehouse import ducklake  # noqa: E402
from prefsynth.warehouse.store import Store  # noqa: E402


def write(warehouse: str, todo: list[dict[str, pl.DataFrame]]) -> dict[str, float]:
    """Rows added and seconds of writing `todo` through one Store (opened and migrated before the clock)."""
    with Store(warehouse) as store:
        start = time.perf_counter()
        added = sum(sum(store.write_frames("bench", b).values()) for b in todo)
        seconds = time.perf_counter() - start
    return {"rows": added, "s": seconds, "rows_per_s": added / seconds, "retried": ducklake.retried}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=10_000, help="rows per write_frames call")
    parser.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    parser.add_argument("--worker", nargs=3, metavar=("WAREHOUSE", "PART", "PARTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        warehouse, part, parts = args.worker[0], int(args.worker[1]), int(args.worker[2])
        todo = frame_batches(args.rows, args.batch, part, parts)
        print(json.dumps(write(warehouse, todo)))
        return

    from tests.postgres import PASSWORD, PostgresServer

    results: dict[str, dict[str, float]] = {}
    everything = frame_batches(args.rows, args.batch)
    with tempfile.TemporaryDirectory() as tmp, PostgresServer() as pg:
        os.environ["PGPASSWORD"] = PASSWORD
        results["single file, 1 writer"] = write(str(Path(tmp) / "w.duckdb"), everything)
        one = pg.create_db("one") + f"?data_path={tmp}/one"
        results["DuckLake, 1 writer"] = write(one, everything)
        two = pg.create_db("two") + f"?data_path={tmp}/two"
        Store(two).close()  # migrated before the writers start
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, __file__, "--rows", str(args.rows), "--batch", str(args.batch),
                                   "--worker", two, str(part), "2"], stdout=subprocess.PIPE, text=True)
                 for part in range(2)]  # fmt: skip
        outs = [json.loads(p.communicate()[0]) for p in procs]
        wall = time.perf_counter() - start  # includes each process's start and migration check
        added = sum(o["rows"] for o in outs)
        writing = max(o["s"] for o in outs)
        results["DuckLake, 2 writer processes"] = {"rows": added, "s": writing, "rows_per_s": added / writing,
                                                   "retried": sum(o["retried"] for o in outs), "wall_s": wall}
        before = ducklake.retried
        again = write(one, everything[: len(everything) // 2])
        results["DuckLake, rewrite of existing rows"] = {
            **again, "rows_per_s": sum(len(df) for b in everything[: len(everything) // 2] for df in b.values())
            / again["s"], "retried": again["retried"] - before}  # fmt: skip
        with Store(two, read_only=True) as store:
            distinct = store.con.execute("SELECT count(*) = count(DISTINCT response_id) FROM responses").fetchone()[0]
        assert distinct and added == args.rows, (added, distinct)

    table = ["| arm | rows added | write s | rows/s | conflicts retried |", "|---|---|---|---|---|"]
    for name, r in results.items():
        table.append(f"| {name} | {r['rows']:,.0f} | {r['s']:.2f} | {r['rows_per_s']:,.0f} | {r['retried']:.0f} |")
    print("\n".join(table))
    if args.record:
        file_rate = results["single file, 1 writer"]["rows_per_s"]
        lines = [f"{args.rows:,} rows in batches of {args.batch:,} (half responses, half scores) through "
                 "Store.write_frames; PostgreSQL 15 on loopback (fsync off), Parquet on the local disk",
                 f"DuckLake 1 writer / single file: {results['DuckLake, 1 writer']['rows_per_s'] / file_rate:.2f}x",
                 "2 writers: each writes every other batch (distinct ids); write s = the slower writer's; "
                 f"wall {results['DuckLake, 2 writer processes']['wall_s']:.1f} s with process start",
                 "rewrite: the first half again, all rows exist (rows/s = rows offered, none added)"]  # fmt: skip
        append_results("DuckLake on PostgreSQL vs the single file: write throughput (issue 15)",
                       f"python bench/ducklake.py --rows {args.rows} --batch {args.batch} --record", lines, table)


if __name__ == "__main__":
    main()
