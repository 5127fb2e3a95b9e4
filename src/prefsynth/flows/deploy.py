"""What Prefect deployments run, and how `prefsynth deploy` and `prefsynth serve` register them.

`run_config` is the entry point: its parameters are plain JSON (a config's path, or its mapping and the folder
it is relative to), so the Prefect server can store and validate them and a worker or a served process can
start a run from them. It runs the pipeline, or the synthesis loop when the config has a `loop` section.

Its entrypoint is the module path `prefsynth.flows.deploy.run_config`: a process that has prefsynth
installed (a `prefect worker start --pool …` or `prefsynth serve`) loads it without a copy of any source
folder, image or registry.
"""

# No `from __future__ import annotations` here: a deployment's run process validates its parameters against
# the flow's annotations, and a string annotation does not resolve there (issue 13).
import os
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from prefect import flow

from prefsynth.api import as_config, with_runner
from prefsynth.errors import DeployError, reason
from prefsynth.flows.loop import synthesis_loop
from prefsynth.flows.prefect_api import configured_api_url
from prefsynth.flows.synthesize import synthesize
from prefsynth.schemas.config import PipelineConfig
from prefsynth.warehouse.ducklake import check_name, is_lake

ENTRYPOINT = "prefsynth.flows.deploy.run_config"


@flow(name="prefsynth-run")
def run_config(config: str | dict[str, Any], base_dir: str | None = None, db: str | None = None,
               runner: Literal["threads", "ray"] | None = None, shard: int | None = None,
               shards: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Run a pipeline config as `prefsynth run` (or `prefsynth loop`, when it has a `loop` section) would
    when started in the folder `base_dir` (default: this process's working folder).

    `config`: a YAML file's path, or a mapping shaped like the YAML. Relative input paths (prompts, GGUF files)
    resolve against the file's folder, or `base_dir` for a mapping; the warehouse, `db` and export paths
    against `base_dir`. `runner` overrides the config's (`--runner`). `shard` and `shards` run shard `shard`
    (from 0) of `shards` only (flows/shards.py): its prompts generated and scored, nothing curated or exported.
    Returns the run's summary as JSON.
    """
    base = Path(base_dir or os.getcwd()).resolve()
    cfg = anchored(as_config(config if isinstance(config, dict) else base / config, base), base)
    cfg = with_runner(cfg, runner)
    warehouse = warehouse_name(base, db) if db else cfg.warehouse
    # inline, not a subflow: the deployment's flow run is the run (its summary artifact, its id in `runs`)
    if shard is not None or shards is not None:
        if shard is None or shards is None:
            raise DeployError("a shard's run needs both `shard` and `shards`")
        if cfg.loop is not None:
            raise DeployError("a config with a `loop` section cannot run in shards")
        summary = synthesize.fn(config=cfg, db=warehouse, shard=f"{shard}/{shards}")
    else:
        summary = (synthesis_loop if cfg.loop is not None else synthesize).fn(config=cfg, db=warehouse)
    return summary.model_dump(mode="json")


def anchored(config: PipelineConfig, base: Path) -> PipelineConfig:
    """`config` with its outputs (warehouse, export folders) made absolute against `base`."""
    exports = [t.model_copy(update={"path": str(base / t.path)}) for t in config.export]
    return config.model_copy(update={"warehouse": warehouse_name(base, config.warehouse), "export": exports})


def warehouse_name(base: Path, warehouse: str | Path) -> str:
    """A warehouse file's path made absolute against `base`; a DuckLake's name as it is (it names no file)."""
    return str(warehouse) if is_lake(warehouse) else str(base / warehouse)


def parameters(config: Path, db: Path | None = None) -> dict[str, Any]:
    """A deployment's parameters for a config file: absolute paths, the current folder as `base_dir` (where
    relative outputs go, as on the command line). The config is validated here, before anything is registered."""
    as_config(config)
    check_name(db)
    base = Path.cwd()
    return {"config": str(config.resolve()), "base_dir": str(base), "db": warehouse_name(base, db) if db else None}


def schedule(cron: str | None, interval: float | None) -> dict[str, Any]:
    """`cron`/`interval` arguments for Prefect, checked: a bad cron expression names itself."""
    if cron is not None and interval is not None:
        raise DeployError("give --cron or --interval, not both")
    if interval is not None:
        if interval <= 0:
            raise DeployError(f"--interval must be a positive number of seconds, got {interval}")
        return {"interval": timedelta(seconds=interval)}
    if cron is None:
        return {}
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        raise DeployError(f"--cron {cron!r} is not a cron expression (five fields: minute hour day month "
                          f"weekday, e.g. '0 3 * * *' for 03:00 every day): {reason(err)}") from None  # fmt: skip
    return {"cron": cron}


def require_server() -> str:
    """The configured Prefect server's API URL; fails clearly when there is none or it does not answer."""
    url = configured_api_url()
    if not url:
        raise DeployError("a deployment lives on a Prefect server and none is configured: start one with "
                          "`prefect server start`, then set PREFECT_API_URL=http://127.0.0.1:4200/api "
                          "(or `prefect config set PREFECT_API_URL=…`)")  # fmt: skip
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10):
            pass
    except urllib.error.HTTPError:
        pass  # it answered (Prefect Cloud asks for a key here): reachable
    except (OSError, ValueError) as err:
        raise DeployError(f"the Prefect server at {url} (PREFECT_API_URL) does not answer: {err}; "
                          "is `prefect server start` running?") from None  # fmt: skip
    return url


def deploy(config: Path, name: str, pool: str, cron: str | None = None, interval: float | None = None,
           db: Path | None = None) -> tuple[str, bool]:  # fmt: skip
    """Register (or update) the deployment `prefsynth-run/NAME` of `config` on the work pool `pool`, created as
    a process pool if missing. Returns the deployment's id and whether the pool was created."""
    from prefect.deployments.runner import EntrypointType

    params, when = parameters(config, db), schedule(cron, interval)  # bad input fails before the server is asked
    require_server()
    created = _ensure_pool(pool)
    deployment = run_config.to_deployment(name=name, parameters=params, entrypoint_type=EntrypointType.MODULE_PATH,
                                          work_pool_name=pool, description=f"prefsynth run {params['config']}",
                                          **when)  # fmt: skip
    return str(deployment.apply(work_pool_name=pool)), created


def serve(config: Path, name: str, cron: str | None = None, interval: float | None = None,
          db: Path | None = None) -> None:  # fmt: skip
    """Register `prefsynth-run/NAME` of `config` and run its runs (scheduled, or started through the API or
    UI) from this process until Ctrl-C."""
    from prefect import serve as prefect_serve
    from prefect.deployments.runner import EntrypointType

    params, when = parameters(config, db), schedule(cron, interval)  # bad input fails before the server is asked
    require_server()
    deployment = run_config.to_deployment(name=name, parameters=params, entrypoint_type=EntrypointType.MODULE_PATH,
                                          description=f"prefsynth run {params['config']}", **when)  # fmt: skip
    prefect_serve(deployment, print_starting_message=True)


def _ensure_pool(pool: str) -> bool:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            return False
    return True


