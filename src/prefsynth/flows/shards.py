"""Sharded runs: `prefsynth run CONFIG --shards N` on the workers of a Prefect work pool.

A shard is a stable hash range of prompt ids: shard i of N holds the prompts whose id's first 64 bits fall in
[i·2^64/N, (i+1)·2^64/N). Membership depends only on the prompt and N, never on the order or the other
prompts, so a rerun finds the same shards. Doubling N splits each range in two (shard i of N is shards 2i and
2i+1 of 2N); another N draws other boundaries, which costs nothing more: the calls are cached by content, so
a prompt done under one N is answered from the warehouse under another.

The parent flow (`prefsynth-shards`) registers the deployment `prefsynth-run/prefsynth-shards` of the entry
flow on a work pool, starts one child flow run per shard through it (`run_deployment`, linked as subflows),
waits for them all, and when every shard completed runs the whole config once in its own process: that run
ingests every prompt, finds every call in the warehouse (0 new calls), screens, curates and exports. A shard
generates and scores its range only; screens, the teacher, curation and exports need every prompt and happen
once, in the parent. If a shard failed or was cancelled, the parent fails naming it and does not curate;
`prefsynth run CONFIG --shard i/N` reruns it alone, and rerunning the parent reruns every shard, each making
only the calls still missing.

Every shard writes the same warehouse: a DuckLake takes them at once; a single file takes them in turns
(flows/exclusive.py), so there the shards add no speed.
"""

# No `from __future__ import annotations` here: Prefect validates a flow's parameters against its annotations.
import json
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger

from prefsynth.errors import ConfigError, RunFailed
from prefsynth.warehouse.ducklake import is_lake

DEPLOYMENT = "prefsynth-shards"
SPACE = 1 << 64


def shard_of(prompt_id: str, count: int) -> int:
    """The shard (0 … count-1) that holds the prompt `prompt_id` (hex) among `count` shards."""
    return (int(prompt_id[:16], 16) * count) >> 64


def parse_shard(text: str) -> tuple[int, int]:
    """`i/N` (shard i of N, counted from 0) as (i, N); a clear error otherwise."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must be INDEX/COUNT, e.g. 0/2 (the first of two shards), got {text!r}") from None
    check_count(count)
    if not 0 <= index < count:
        raise ConfigError(f"--shard {text}: the index counts from 0 to {count - 1}")
    return index, count


def check_count(count: int) -> None:
    if not 1 <= count <= 1024:
        raise ConfigError(f"the number of shards must be 1 to 1024, got {count}")


def shard_parameters(config: str, base_dir: str, db: str | None, runner: str | None, index: int,
                     count: int) -> dict[str, Any]:  # fmt: skip
    """A child run's parameters (plain JSON)."""
    return {"config": config, "base_dir": base_dir, "db": db, "runner": runner, "shard": index, "shards": count}


def register(pool: str) -> str:
    """Create (or update) the deployment the shards run through on `pool` (a process pool, created if missing);
    returns its full name. It has no parameters of its own: each child run brings its shard's."""
    from prefect.deployments.runner import EntrypointType

    from prefsynth.flows.deploy import _ensure_pool, run_config

    _ensure_pool(pool)
    deployment = run_config.to_deployment(name=DEPLOYMENT, entrypoint_type=EntrypointType.MODULE_PATH,
                                          work_pool_name=pool, description="one shard of `prefsynth run --shards`")
    deployment.apply(work_pool_name=pool)
    return f"prefsynth-run/{DEPLOYMENT}"


@flow(name="prefsynth-shards")
def sharded_run(config: str, base_dir: str, shards: int, pool: str = "prefsynth", db: str | None = None,
                runner: Literal["threads", "ray"] | None = None, poll_s: float = 1.0) -> dict[str, Any]:  # fmt: skip
    """Run `config` (a YAML path, absolute or under `base_dir`) as `shards` child runs on the work pool `pool`,
    then curate and export once. Returns {"shards": [per shard: index, flow run, state, calls], "summary": the
    final run's summary}. Raises RunFailed naming the shards that did not complete."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    from prefsynth.api import as_config, with_runner
    from prefsynth.flows.deploy import anchored, warehouse_name
    from prefsynth.flows.synthesize import synthesize
    from prefsynth.warehouse.store import Store

    check_count(shards)
    logger = get_run_logger()
    base = Path(base_dir)
    cfg = with_runner(anchored(as_config(base / config, base), base), runner)
    warehouse = warehouse_name(base, db) if db else cfg.warehouse
    if not is_lake(warehouse):
        logger.warning(f"warehouse {warehouse} is a single DuckDB file: the {shards} shards take turns on it, one "
                       "at a time. For shards that write at once, use a DuckLake warehouse (ducklake:postgres://…)")
    with Store(warehouse, wait_s=cfg.warehouse_wait_s, notify=logger.warning):
        pass  # opened (and migrated) once here: an unreachable warehouse fails now, not in every shard
    name = register(pool)
    children = [run_deployment(name, parameters=shard_parameters(config, base_dir, db, runner, i, shards),
                               timeout=0, as_subflow=True, flow_run_name=f"shard-{i}-of-{shards}")
                for i in range(shards)]  # fmt: skip
    logger.info(f"started {shards} shards on work pool {pool!r}: {', '.join(str(c.id) for c in children)}")
    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(c.id) for c in children]
            if all(r.state is not None and r.state.is_final() for r in runs):
                break
            time.sleep(poll_s)
        rows = [{"shard": f"{i}/{shards}", "flow_run": str(r.id), "state": r.state.name if r.state else "?",
                 "calls": _calls(client, r.id)} for i, r in enumerate(runs)]  # fmt: skip
    for row in rows:
        logger.info(f"shard {row['shard']}: {row['state']}, {row['calls']} new model calls "
                    f"(flow run {row['flow_run']})")
    bad = [row for row in rows if row["state"] != "Completed"]
    if bad:
        reruns = "; ".join(f"prefsynth run {config} --shard {row['shard']}" for row in bad)
        raise RunFailed(f"{len(bad)} of {shards} shards did not complete ("
                        + ", ".join(f"{row['shard']} {row['state']}" for row in bad)
                        + f"): nothing was curated or exported. Rerun a shard alone ({reruns}), then this "
                        "command; or rerun this command, which reruns every shard, each making only the calls "
                        "still missing")  # fmt: skip
    # every call is in the warehouse now: one run over the whole config screens, curates and exports
    summary = synthesize.fn(config=cfg, db=warehouse)
    return {"shards": rows, "summary": summary.model_dump(mode="json")}


def _calls(client: Any, flow_run_id: Any) -> int | None:
    """The new model calls of a shard's run, from its summary artifact (None when it has none)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    found = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=["prefsynth-run-summary"])))
    if not found:
        return None
    rows = found[0].data if isinstance(found[0].data, list) else json.loads(found[0].data or "[]")
    return sum(int(row.get("model_calls", 0)) for row in rows)
