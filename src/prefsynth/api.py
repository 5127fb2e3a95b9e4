"""The Python API, the layer the CLI is built on: run a pipeline, score items, read the warehouse.

    import prefsynth
    result = prefsynth.run("examples/quickstart.yaml", prompts=["Name a prime.", "Say hi."])
    result.pairs          # polars DataFrame of chosen/rejected pairs with their texts
    result.dataset        # the same pairs as a datasets.Dataset in TRL's conversational format
    result.dataset_dict({"train": 0.9, "test": 0.1}, seed=0)   # split by prompt, as `export` splits
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefsynth.errors import ConfigError, DeployError, reason
from prefsynth.schemas.config import PipelineConfig, ScorerSpec, load_config, parse_config, parse_scorer
from prefsynth.schemas.records import LoopSummary, RunSummary, StageCounts

if TYPE_CHECKING:  # polars and datasets load when used: the CLI starts Prefect's API before
    import datasets
    import polars as pl

    from prefsynth.flows.prefect_api import TemporaryAPI

ConfigLike = PipelineConfig | Mapping[str, Any] | str | Path


@dataclass
class RunResult:
    """What `run` returns: the run's id, status, counts per stage and its pairs."""

    summary: RunSummary
    config: PipelineConfig
    pairs: pl.DataFrame  # one row per pair: prompt messages, chosen and rejected texts, scores, provenance
    timings: dict[str, float] = field(default_factory=dict)  # seconds: imports, servers, api, flow

    @property
    def run_id(self) -> str:
        return self.summary.run_id

    @property
    def status(self) -> str:
        return self.summary.status

    @property
    def warehouse(self) -> str:
        return self.summary.warehouse

    @property
    def counts(self) -> dict[str, StageCounts]:
        """Per stage (ingest, generate, score[name], curate): total, reused, new, failed, model calls, tokens."""
        return {s.stage: s for s in self.summary.stages}

    @cached_property
    def dataset(self) -> datasets.Dataset:
        """The pairs in TRL's conversational preference format (prompt, chosen, rejected, source, score_gap,
        scores, provenance), with no `margin` column: `prefsynth export --margin` writes one deliberately."""
        import datasets

        from prefsynth.tasks.export import to_trl

        return datasets.Dataset.from_polars(to_trl(self.pairs))

    def dataset_dict(self, splits: Mapping[str, float], seed: int = 0) -> datasets.DatasetDict:
        """The pairs as a `datasets.DatasetDict`, split by prompt as an export with these `splits` (e.g.
        {"train": 0.9, "test": 0.1}) and `seed` splits them: the same prompts land in the same splits."""
        from prefsynth.schemas.config import Splits
        from prefsynth.tasks.export import dataset_dict

        try:
            spec = Splits(fractions=dict(splits), seed=seed)
        except ValueError as err:
            raise ConfigError(reason(err)) from None
        return dataset_dict(self.pairs, spec)


def as_config(config: ConfigLike, base_dir: str | Path | None = None) -> PipelineConfig:
    """A validated config from a model, a mapping (relative input paths resolve against `base_dir`, default the
    current folder) or a YAML file's path."""
    if isinstance(config, PipelineConfig):
        return config
    if isinstance(config, str | Path):
        return load_config(config)
    if isinstance(config, Mapping):
        return parse_config(dict(config), "config", Path(base_dir or ".").resolve())
    raise ConfigError(f"config must be a PipelineConfig, a mapping or a YAML path, got {type(config).__name__}")


def with_prompts(config: PipelineConfig, label: str = "python") -> PipelineConfig:
    """`config` reading its prompts from memory (field names and limit kept) instead of its own source."""
    source = config.prompts.model_dump(exclude={"path", "hf_dataset", "warehouse_table", "builtin", "split"})
    return config.model_copy(update={"prompts": type(config.prompts)(**{**source, "in_memory": label})})


def run(
    config: ConfigLike,
    prompts: Any = None,
    *,
    db: str | Path | None = None,
    base_dir: str | Path | None = None,
    runner: str | None = None,
    shard: str | None = None,
) -> RunResult:
    """Run a pipeline: ingest, generate, score, curate, export. A rerun computes only what is missing.

    `config`: a PipelineConfig, a mapping shaped like the YAML, or a YAML file's path. `prompts` (optional)
    replaces the config's prompt source: a list of texts, message lists or records, a polars or pandas
    DataFrame, or a `datasets.Dataset`. `db` overrides the config's warehouse. Local models and Prefect's
    temporary API (unless a Prefect server is configured, or this is called inside a flow) start at once and
    stop when the run ends; the run streams while that API starts (flows/headstart.py). Raises `RunFailed`
    (its `summary` is the run's) when the run produced no responses or
    scores, or when items failed and the config sets `failures_fatal`. `runner` ("threads" or "ray") overrides
    the config's `runner`: where in-process reward models and dedup run. `shard` ("i/N") runs shard i of N
    alone, in this process: its prompts generated and scored, nothing curated (see `run_shards`).
    """
    cfg = with_runner(_config(config, prompts, base_dir), runner)
    if cfg.loop is not None:
        raise ConfigError("this config has a `loop` section: run it with `prefsynth loop` (or prefsynth.run_loop)")
    if shard is not None:
        from prefsynth.flows.shards import parse_shard

        parse_shard(shard)
    summary, timings = _execute(cfg, prompts, db, loop=False, shard=shard)
    return RunResult(summary=summary, config=cfg, pairs=_run_pairs(summary), timings=timings)


@dataclass
class ShardedResult:
    """What `run_shards` returns: each shard's child flow run (index, id, state, new calls) and the final run."""

    shards: list[dict[str, Any]]
    summary: RunSummary


def run_shards(config: str | Path, shards: int, *, pool: str = "prefsynth", db: str | Path | None = None,
               base_dir: str | Path | None = None, runner: str | None = None) -> ShardedResult:  # fmt: skip
    """Run the YAML config `config` as `shards` child flow runs on the workers of the Prefect work pool `pool`
    (flows/shards.py), then curate and export once in this process. Needs a Prefect server that the workers
    share (PREFECT_API_URL). Raises RunFailed naming the shards that failed or were cancelled."""
    from prefsynth.flows.deploy import require_server
    from prefsynth.flows.prefect_api import configured_api_url
    from prefsynth.flows.shards import check_count, sharded_run
    from prefsynth.warehouse.ducklake import check_name

    check_count(shards)
    check_name(db)
    base = Path(base_dir or Path.cwd()).resolve()
    path = (base / config).resolve()
    cfg = with_runner(as_config(path), runner)  # bad input fails before the server is asked
    if cfg.loop is not None:
        raise ConfigError("a config with a `loop` section cannot run in shards")
    if not configured_api_url():
        raise DeployError("--shards runs each shard on a worker of a Prefect work pool, which needs a Prefect server "
                          "that other processes share: start one (`prefect server start`), set "
                          "PREFECT_API_URL=http://127.0.0.1:4200/api, and start workers "
                          f"(`prefect worker start --pool {pool} --type process`)")  # fmt: skip
    require_server()
    out = sharded_run(config=str(path), base_dir=str(base), shards=shards, pool=pool,
                      db=str(db) if db else None, runner=runner)  # fmt: skip
    return ShardedResult(shards=out["shards"], summary=RunSummary.model_validate(out["summary"]))


def run_loop(config: ConfigLike, prompts: Any = None, *, db: str | Path | None = None,
             base_dir: str | Path | None = None) -> tuple[LoopSummary, dict[str, float]]:  # fmt: skip
    """Run a config with a `loop` section as a synthesis loop (arguments as for `run`); returns its summary
    (one row per round) and timings. A rerun makes no model call."""
    cfg = _config(config, prompts, base_dir)
    if cfg.loop is None:
        raise ConfigError("this config has no `loop` section: run it with `prefsynth run`")
    return _execute(cfg, prompts, db, loop=True)


def with_runner(config: PipelineConfig, runner: str | None) -> PipelineConfig:
    """`config` with its `runner` replaced (validated), when one is given; checks that Ray is installed for `ray`
    before anything starts."""
    if runner is not None:
        if runner not in ("threads", "ray"):
            raise ConfigError(f"runner must be threads or ray, got {runner!r}")
        config = config.model_copy(update={"runner": runner})
    if config.runner == "ray":
        from prefsynth.flows.runner import require_ray

        require_ray()
    return config


def _config(config: ConfigLike, prompts: Any, base_dir: str | Path | None) -> PipelineConfig:
    if prompts is not None and isinstance(config, Mapping) and "prompts" not in config:
        config = {**config, "prompts": {"in_memory": "python"}}
    cfg = as_config(config, base_dir)
    if any(target.push_to_hub for target in cfg.export):  # no token, no network: stop before any work
        from prefsynth.backends.hub import hub_token

        hub_token()
    return with_prompts(cfg) if prompts is not None else cfg


def _execute(cfg: PipelineConfig, prompts: Any, db: str | Path | None, loop: bool,
             shard: str | None = None) -> tuple[Any, dict[str, float]]:  # fmt: skip
    """The pipeline flow (or the loop flow), with local models and Prefect's temporary API around it.

    With a temporary API, a run streams while the API starts and Prefect is imported (flows/headstart.py)."""
    from prefsynth.backends.local import LocalServers, sharing
    from prefsynth.flows.headstart import eligible, head_start
    from prefsynth.flows.prefect_api import inside_flow, launching, no_server_configured, prefect_api, using
    from prefsynth.tasks.ingest import giving
    from prefsynth.warehouse.ducklake import check_name

    check_name(db)
    timings: dict[str, float] = {}
    db_name = str(db) if db else None
    early = not loop and shard is None and eligible(cfg) and not inside_flow() and no_server_configured()
    with launching(), LocalServers() as servers, sharing(servers), giving(prompts):
        for model in cfg.all_models():
            servers.launch(model)  # they load while the rest is imported and Prefect's API starts
        if not early:
            flows = _flows(timings)
        servers.wait_ready()
        timings["servers"] = servers.ready_after()
        run_started = time.monotonic()  # the run's own time: from its opening (here, or in its flow) to its end
        with head_start(cfg, db_name) if early else contextlib.nullcontext(), _api(prefect_api) as api:
            if early:
                flows = _flows(timings)  # while the run streams
            with _using(using, api):
                timings["api"] = api.ready_after if api and api.ready_after else 0.0
                if not early:
                    run_started = time.monotonic()
                summary = flows[1](config=cfg, db=db_name) if loop else flows[0](config=cfg, db=db_name, shard=shard)
                timings["flow"] = time.monotonic() - run_started
    return summary, timings


def _flows(timings: dict[str, float]) -> tuple[Any, Any]:
    """The pipeline and loop flows (importing them imports Prefect); the seconds it took go in `timings`."""
    started = time.monotonic()
    from prefsynth.flows.loop import synthesis_loop
    from prefsynth.flows.synthesize import synthesize

    timings["imports"] = time.monotonic() - started
    return synthesize, synthesis_loop


@contextlib.contextmanager
def _api(prefect_api: Any) -> Iterator[TemporaryAPI | None]:
    """Prefect's temporary API, unless this runs inside a flow (the run is then its subflow)."""
    from prefsynth.flows.prefect_api import inside_flow

    if inside_flow():
        yield None
        return
    with prefect_api() as api:
        yield api


def _using(using: Any, api: TemporaryAPI | None) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext() if api is None else using(api)


def _run_pairs(summary: RunSummary) -> pl.DataFrame:
    from prefsynth.warehouse.store import Store

    with Store(summary.warehouse, read_only=True) as store:
        return store.export_rows(summary.run_id)[1]


def score(scorer: ScorerSpec | Mapping[str, Any], items: Any, *, base_dir: str | Path | None = None) -> pl.DataFrame:
    """Score items with one scorer, outside any pipeline and warehouse (nothing is cached).

    `scorer`: a scorer spec or a mapping shaped like one entry of a config's `scorers`. `items`: a list or a
    polars DataFrame. A pointwise scorer takes (prompt, response) items; a pairwise judge takes
    (prompt, a, b). A prompt is a text or a message list. Returns one row per item, in order: `index`, then
    `value` and `rationale` (pointwise) or `winner`, `score_a`, `consistent`, `flipped` (pairwise), and
    `error` (set when the item failed, with no value).
    """
    import polars as pl

    from prefsynth.tasks.score_text import score_batch

    spec = scorer if not isinstance(scorer, Mapping) else parse_scorer(dict(scorer), Path(base_dir or ".").resolve())
    rows = items.to_dicts() if isinstance(items, pl.DataFrame) else list(_as_sequence(items))
    return score_batch(spec, rows)


def _as_sequence(items: Any) -> Sequence[Any]:
    if isinstance(items, str | bytes | Mapping) or not hasattr(items, "__iter__"):
        raise ConfigError(f"items must be a list or a polars DataFrame, got {type(items).__name__}")
    return list(items)
