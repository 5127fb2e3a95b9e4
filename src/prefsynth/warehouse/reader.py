"""`prefsynth.Warehouse`: a read-only view of a warehouse file as polars frames, for notebooks and scripts.

Each call opens the file read-only and closes it again, so a handle never blocks a run that writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from prefsynth.errors import WarehouseError
from prefsynth.warehouse.ducklake import is_lake
from prefsynth.warehouse.store import Store

_RUNS = """
SELECT r.run_id, r.kind, r.name, coalesce(e.status, 'interrupted or running') AS status, r.started_at, e.finished_at,
       (SELECT count(*) FROM run_prompts x WHERE x.run_id = r.run_id) AS prompts,
       (SELECT count(*) FROM run_pairs x WHERE x.run_id = r.run_id) AS pairs,
       (SELECT count(*) FROM model_calls x WHERE x.run_id = r.run_id) AS model_calls,
       r.flow_run_id
FROM runs r LEFT JOIN run_ends e USING (run_id)
ORDER BY r.started_at, r.run_id
"""
_OF_RUN = "prompt_id IN (SELECT prompt_id FROM run_prompts WHERE run_id = $run)"


class Warehouse:
    """A warehouse file, read-only: runs, prompts, responses, scores, pairs, failures and snapshots."""

    def __init__(self, path: str | Path = "prefsynth.duckdb") -> None:
        self.path = Path(path)
        if not is_lake(path) and not self.path.exists():
            raise WarehouseError(f"warehouse not found: {self.path}")

    def __repr__(self) -> str:
        return f"Warehouse({str(self.path)!r})"

    def sql(self, query: str, params: list[Any] | dict[str, Any] | None = None) -> pl.DataFrame:
        """Any read-only SQL over the warehouse's tables and views."""
        with Store(self.path, read_only=True) as store:
            return store.con.execute(query, params or []).pl()

    def runs(self) -> pl.DataFrame:
        """One row per run, oldest first: kind (synthesize or eval), status, times, prompts, pairs, new calls."""
        return self.sql(_RUNS)

    def pairs(self, run: str | None = None) -> pl.DataFrame:
        """The pairs a run selected (default: the newest completed run), with prompt and response texts."""
        with self._open(run) as store:
            _, rows = store.export_rows(run)
        return rows.drop("run_id") if "run_id" in rows.columns else rows

    def prompts(self, run: str | None = None) -> pl.DataFrame:
        """Prompts (messages as JSON), all or those of one run."""
        where = f"WHERE {_OF_RUN}" if run else ""
        return self._select(f"SELECT * FROM prompts {where} ORDER BY prompt_id", run)

    def responses(self, run: str | None = None) -> pl.DataFrame:
        """Responses, all or every stored response to one run's prompts."""
        where = f"WHERE {_OF_RUN}" if run else ""
        return self._select(f"SELECT * FROM responses {where} ORDER BY prompt_id, model, sample_index, response_id",
                            run)  # fmt: skip

    def scores(self, run: str | None = None, scorer: str | None = None) -> pl.DataFrame:
        """Scores with their response's prompt: all, or of one run's prompts, or of one scorer name."""
        conds = [f"r.{_OF_RUN}"] if run else []
        conds += ["s.scorer = $scorer"] if scorer else []
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        sql = (f"SELECT s.*, r.prompt_id FROM scores s JOIN responses r USING (response_id) {where} "
               "ORDER BY s.scorer, r.prompt_id, s.response_id")  # fmt: skip
        return self._select(sql, run, {"scorer": scorer} if scorer else {})

    def failures(self, run: str | None = None) -> pl.DataFrame:
        """Items a stage could not finish (one row per attempt): all, or those of one run."""
        where = "WHERE run_id = $run" if run else ""
        return self._select(f"SELECT * FROM failures {where} ORDER BY created_at, item_id", run)

    def snapshots(self) -> pl.DataFrame:
        """Datasets exported from the warehouse: format, path, pairs, run, time."""
        return self.sql("SELECT * FROM dataset_snapshots ORDER BY created_at, snapshot_id")

    def _select(self, sql: str, run: str | None, params: dict[str, Any] | None = None) -> pl.DataFrame:
        params = {**(params or {}), **({"run": run} if run else {})}
        with self._open(run) as store:
            return store.con.execute(sql, params).pl()

    def _open(self, run: str | None) -> Store:
        """The file, read-only; WarehouseError if `run` is given and is none of its runs."""
        store = Store(self.path, read_only=True)
        if run is not None and store.run_kind(run) is None:
            store.close()
            raise WarehouseError(f"{self.path} has no run {run!r}")
        return store
