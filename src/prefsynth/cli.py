"""The `prefsynth` command: run pipelines, look into the warehouse, export training sets."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from prefsynth.cli_common import console, fail
from prefsynth.errors import ConfigError, PrefsynthError, RunFailed, reason

if TYPE_CHECKING:
    from prefsynth.schemas.records import RunSummary
    from prefsynth.tasks.export import Exported

_IMPORTED = time.monotonic()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# where Prefect starts its own temporary API (library use), its first start on a new machine needs more than 20 s
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")

app = typer.Typer(
    help="prefsynth: synthesize preference pairs (chosen/rejected) with Prefect into a DuckDB warehouse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
DB_HELP = ("DuckDB warehouse file, or a DuckLake warehouse: ducklake:postgres://USER@HOST:PORT/DBNAME "
           "(password from PGPASSWORD).")
RUNNER_HELP = ("threads | ray: where in-process reward models and dedup run (overrides the config's `runner`). "
               "ray needs prefsynth's `ray` extra; it uses ray_address or RAY_ADDRESS, else a local Ray instance.")
DbOption = Annotated[Path | None, typer.Option("--db", help=DB_HELP + " Overrides the config's `warehouse`.")]


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.2f}/s" if task.speed else "–/s", style="progress.data.speed")


class _Bars:
    """The CLI's progress view: one bar per stage (done/to do, rate, elapsed, ETA), shown from the first stage."""

    def __init__(self) -> None:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]  # fmt: skip
        self.progress = Progress(*columns, console=console, transient=False, refresh_per_second=4)
        self.ids: dict[str, int] = {}

    def start(self, stage: str, total: int) -> None:
        if not self.ids:
            self.progress.start()
        self.ids[stage] = self.progress.add_task(escape(stage), total=total)

    def advance(self, stage: str, n: int = 1) -> None:
        self.progress.advance(self.ids[stage], n)

    @contextlib.contextmanager
    def shown(self) -> Iterator[None]:
        """Stage progress of this process goes to the bars while inside."""
        from prefsynth.flows.progress import showing

        try:
            with showing(self):
                yield
        finally:
            if self.ids:
                self.progress.stop()


POOL_HELP = "Work pool (created as a process work pool if missing)."
SHARDS_HELP = ("Split the prompts into N stable hash ranges and run each as a child flow run on the workers of "
               "the Prefect work pool --pool, then curate and export once (needs PREFECT_API_URL).")
SHARD_HELP = "Run one shard alone here, as INDEX/COUNT from 0 (e.g. 1/2): generate and score its prompts only."


def _run_shards(config: Path, shards: int, pool: str, db: Path | None, runner: str | None) -> None:
    """`prefsynth.run_shards`, then a row per shard and the final run's summary."""
    signal.signal(signal.SIGTERM, _stop)
    try:
        from prefsynth.api import run_shards

        result = run_shards(config, shards, pool=pool, db=db, runner=runner)
    except RunFailed as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        raise typer.Exit(1) from None
    except PrefsynthError as err:
        raise fail(err) from None
    table = Table(title=f"{shards} shards on work pool {pool}")
    for col in ("shard", "flow run", "state", "new model calls"):
        table.add_column(col, justify="right" if col == "new model calls" else "left")
    for row in result.shards:
        table.add_row(row["shard"], row["flow_run"], row["state"], _cell(row["calls"]))
    Console().print(table)
    _show_summary(result.summary)


def _run_config(config_path: Path | None, db: Path | None, packaged: bool = False, runner: str | None = None,
                shard: str | None = None) -> None:  # fmt: skip
    """`prefsynth.run` with progress bars, then the summary table and the timings split."""
    signal.signal(signal.SIGTERM, _stop)  # `timeout`, `docker stop`, a scheduler's preemption: stop as on Ctrl-C
    from prefsynth.flows.prefect_api import launching

    try:
        with launching():  # Prefect's API starts while the rest is imported and the run is opened
            from prefsynth.api import run

            with _Bars().shown():
                if packaged:
                    with resources.as_file(resources.files("prefsynth").joinpath("examples", "quickstart.yaml")) as p:
                        result = run(p, db=db, runner=runner)
                else:
                    result = run(config_path, db=db, runner=runner, shard=shard)  # type: ignore[arg-type]
    except RunFailed as err:  # the flow failed the run (no results, or failures_fatal): show it, exit 1
        if err.summary is not None:
            _show_summary(err.summary)
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        raise typer.Exit(1) from None
    except PrefsynthError as err:
        raise fail(err) from None
    except (KeyboardInterrupt, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "Query interrupted" not in str(err):  # DuckDB's form of Ctrl-C
            raise
        console.print("[yellow]interrupted:[/] the run is marked interrupted; every committed row is kept")
        raise typer.Exit(130) from None
    summary, timings = result.summary, result.timings
    timings["imports"] += _import_seconds()
    _show_summary(summary)
    timings["total"] = _process_seconds()
    print("timings: " + " ".join(f"{k}={v:.2f}" for k, v in timings.items()))
    if summary.budget:
        Console().print(f"budget: {summary.budget}")
    if summary.status == "budget_exhausted":
        console.print(f"[yellow]run {summary.run_id} stopped: its budget is spent[/] ({escape(summary.budget or '')}). "
                      "What finished is in the warehouse and no export was replaced; run it again (with a larger "
                      "budget) to continue: cached calls are free")  # fmt: skip
        raise typer.Exit(3)


def _show_summary(summary: RunSummary) -> None:
    """The stage table and the run's totals."""
    table = Table(title=f"run {summary.run_id} → {summary.warehouse}")
    for col in ("stage", "total", "reused", "new", "failed", "model calls", "tokens"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in summary.stages:
        table.add_row(*(_cell(v) for v in (s.stage, s.total, s.reused, s.new, s.failed, s.model_calls, s.tokens)))
    Console().print(table)
    Console().print(
        f"{summary.pairs} pairs, {summary.model_calls} new model calls, {summary.failures} failures, "
        f"{summary.seconds:.1f} s" + "".join(f"\nexported: {p}" for p in summary.exports)
    )


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _process_seconds() -> float:
    """Seconds since this process started (Linux), else since the CLI module was imported."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def _import_seconds() -> float:
    """Seconds from process start to this module's import (interpreter and CLI imports)."""
    return max(0.0, _process_seconds() - (time.monotonic() - _IMPORTED))


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Pipeline config (YAML).")],
    db: DbOption = None,
    runner: Annotated[str | None, typer.Option("--runner", help=RUNNER_HELP)] = None,
    shards: Annotated[int | None, typer.Option("--shards", help=SHARDS_HELP)] = None,
    pool: Annotated[str, typer.Option("--pool", help=POOL_HELP)] = "prefsynth",
    shard: Annotated[str | None, typer.Option("--shard", help=SHARD_HELP)] = None,
) -> None:
    """Run a pipeline config: ingest, generate, score, curate, export.

    Example: prefsynth run examples/quickstart.yaml --db my.duckdb --runner ray

    A rerun of the same config makes no new model calls; new prompts compute only what is missing. With a
    `budget` in the config, the run stops making calls when it is spent and exits 3 (status
    budget_exhausted); run it again to continue.

    With --shards N (needs PREFECT_API_URL and workers on the pool): one child flow run per shard of the
    prompts, on the pool's workers, then curation and export once here.
    """
    if shards is not None and shard is not None:
        raise fail(ConfigError("give --shards N (every shard, on workers) or --shard i/N (one, here), not both"))
    if shards is not None:
        _run_shards(config, shards, pool, db, runner)
        return
    _run_config(config, db, runner=runner, shard=shard)


@app.command()
def loop(
    config: Annotated[Path, typer.Argument(help="Pipeline config (YAML) with a `loop` section.")],
    db: DbOption = None,
) -> None:
    """Run a synthesis loop: rounds of the pipeline whose target system prompt and judge rubric an optimizer
    rewrites until enough pairs pass a pair-quality check (or `loop.max_rounds`).

    Example: prefsynth loop examples/synthesis-loop.yaml --db loop.duckdb

    Prints one row per round: its prompt versions, pairs, accepted pairs and acceptance rate. A rerun makes
    no model call; `prefsynth stats` shows each prompt version's acceptance rate.
    """
    signal.signal(signal.SIGTERM, _stop)
    from prefsynth.flows.prefect_api import launching

    try:
        with launching():
            from prefsynth.api import run_loop

            with _Bars().shown():
                summary, _ = run_loop(config, db=db)
    except PrefsynthError as err:
        raise fail(err) from None
    table = Table(title=f"loop {summary.loop_id[:12]} → {summary.warehouse}")
    for col in ("round", "target version", "judge version", "pairs", "accepted", "rate", "model calls", "stop"):
        table.add_column(col, justify="right" if col in ("round", "pairs", "accepted", "rate", "model calls")
                         else "left")  # fmt: skip
    for r in summary.rounds:
        table.add_row(*(_cell(v) for v in (r.round, r.target_version[:12], r.judge_version[:12], r.pairs,
                                           r.accepted, r.acceptance_rate, r.model_calls, r.stop_reason)))  # fmt: skip
    Console().print(table)
    Console().print(f"{len(summary.rounds)} rounds, {summary.model_calls} new model calls, stopped: "
                    f"{summary.stop_reason}, {summary.seconds:.1f} s")  # fmt: skip
    if summary.stop_reason == "budget_exhausted":
        console.print("[yellow]the loop's budget is spent:[/] run it again (with a larger budget) to continue; "
                      "cached calls are free")  # fmt: skip
        raise typer.Exit(3)


CRON_HELP = "Schedule: a cron expression, e.g. '0 3 * * *' (03:00 every day, in UTC)."
INTERVAL_HELP = "Schedule: a run every N seconds (instead of --cron)."
NAME_HELP = "Deployment name (it is prefsynth-run/NAME on the server)."


@app.command()
def deploy(
    config: Annotated[Path, typer.Argument(help="Pipeline config (YAML); a `loop` section runs the loop.")],
    name: Annotated[str, typer.Option("--name", help=NAME_HELP)],
    cron: Annotated[str | None, typer.Option("--cron", help=CRON_HELP)] = None,
    interval: Annotated[float | None, typer.Option("--interval", help=INTERVAL_HELP)] = None,
    pool: Annotated[str, typer.Option("--pool", help=POOL_HELP)] = "prefsynth",
    db: DbOption = None,
) -> None:
    """Register (or update) a deployment of CONFIG on the Prefect server in PREFECT_API_URL.

    Example: prefsynth deploy examples/quickstart.yaml --name nightly --cron "0 3 * * *" --pool local

    A worker runs its runs: prefect worker start --pool local (in an environment with prefsynth installed).
    The deployment's parameters are the config's absolute path and this folder (where a relative warehouse
    and export folders go, as with `prefsynth run` here); the config file is read when each run starts.
    """
    from prefsynth.flows.deploy import deploy as register

    try:
        deployment_id, created = register(config, name, pool, cron, interval, db)
    except PrefsynthError as err:
        raise fail(err) from None
    if created:
        console.print(f"created the process work pool {escape(pool)!r}")
    print(f"deployment prefsynth-run/{name} ({deployment_id}) on work pool {pool!r}")
    print(f"start a worker:  prefect worker start --pool {pool!r}\nrun it now:      prefect deployment run "
          f"'prefsynth-run/{name}'")


@app.command()
def serve(
    config: Annotated[Path, typer.Argument(help="Pipeline config (YAML); a `loop` section runs the loop.")],
    name: Annotated[str | None, typer.Option("--name", help=NAME_HELP + " Default: the config file's name.")] = None,
    cron: Annotated[str | None, typer.Option("--cron", help=CRON_HELP)] = None,
    interval: Annotated[float | None, typer.Option("--interval", help=INTERVAL_HELP)] = None,
    db: DbOption = None,
) -> None:
    """Serve CONFIG as a deployment from this process: its scheduled runs, and runs started through Prefect's
    API or UI, run here until Ctrl-C.

    Example: prefsynth serve examples/quickstart.yaml --cron "0 3 * * *"

    Needs a Prefect server (PREFECT_API_URL). Each run starts in a child process; runs on the same
    warehouse take turns.
    """
    from prefsynth.flows.deploy import serve as serving

    try:
        serving(config, name or config.stem, cron, interval, db)
    except PrefsynthError as err:
        raise fail(err) from None


@app.command()
def demo(db: DbOption = None) -> None:
    """Run the quickstart on the embedded default (SmolLM2-135M as policy and judge, on this machine).

    Example: prefsynth demo            (leaves prefsynth.duckdb and exports/quickstart/ here)
    """
    _run_config(None, db, packaged=True)


@app.command()
def stats(
    db: Annotated[Path, typer.Option("--db", help=DB_HELP)] = Path("prefsynth.duckdb"),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Row counts per table, model calls per model, tokens and cost per run, stage and model, scorer
    diagnostics and panel agreement.

    Example: prefsynth stats --db prefsynth.duckdb --json

    Diagnostics per scorer (its latest run): failure rate, length bias (Spearman correlation of score and
    response length in tokens), and for pairwise judges position consistency (share of comparisons whose
    verdict survives swapping the two responses) and first-position rate (share of decisive verdicts for
    the response shown first). Per endpoint: calls, the HTTP requests they took, retries, answers 429 and
    408/409/5xx, timeouts (abandoned requests a server may still bill), dropped connections, seconds slept
    before retries and seconds throttled by rate limits. Replicas (`base_urls`): the calls each answered and
    its failed requests. Panels: Krippendorff's alpha and mean Kendall tau of
    their members. Prompt versions of synthesis loops (`prefsynth loop`): each one's rounds, pairs, accepted
    pairs and acceptance rate. Scorers against human labels (`prefsynth review import`): each scorer's n,
    accuracy, ties and failed over the pairs people decided, as `prefsynth eval` reports them. Length control
    (max_length_ratio, length_matched): per run, the pairs and the median lengths of chosen against rejected
    before and after it.
    """
    from prefsynth.warehouse.store import Store

    try:
        with Store(db, read_only=True) as store:
            data = store.stats()
    except PrefsynthError as err:
        raise fail(err) from None
    if as_json:
        print(json.dumps(data, sort_keys=True))
        return
    out = Console()
    table = Table(title=str(db))
    table.add_column("table")
    table.add_column("rows", justify="right")
    for key, value in data.items():
        if isinstance(value, int):
            table.add_row(key, str(value))
    out.print(table)
    calls = Table(title="model calls")
    for col in ("model", "kind", "calls", "errors", "prompt tokens", "completion tokens"):
        calls.add_column(col)
    for row in data["calls_by_model"]:
        calls.add_row(*(_cell(v) for v in row.values()))
    out.print(calls)
    if data["costs"]:
        costs = Table(title="tokens and cost per run, stage and model (cost: with a `price`; cached answers are free)")
        for col in ("run", "stage", "model", "calls", "errors", "prompt tokens", "completion tokens", "cost"):
            costs.add_column(col, justify="left" if col in ("run", "stage", "model") else "right")
        for row in data["costs"]:
            cost = row["cost"]
            costs.add_row(row["run_id"][:12], *(_cell(row[k]) for k in ("stage", "model", "calls", "errors",
                          "prompt_tokens", "completion_tokens")), "–" if cost is None else f"{cost:.4f}")  # fmt: skip
        out.print(costs)
    if data["retries_by_endpoint"]:
        retries = Table(title="HTTP requests and retries per endpoint")
        for col in ("endpoint", "model", "calls", "errors", "requests", "retries", "429", "5xx", "timeouts", "dropped",
                    "retry wait s", "throttle wait s"):  # fmt: skip
            retries.add_column(col, justify="left" if col in ("endpoint", "model") else "right")
        for row in data["retries_by_endpoint"]:
            retries.add_row(*(escape(_cell(v)) for v in row.values()))
        out.print(retries)
    if data["replicas"]:
        replicas = Table(title="replicas: calls each answered, and its failed requests (retried on the others)")
        for col in ("model", "replica", "answered", "failed calls", "failed requests"):
            replicas.add_column(col, justify="left" if col in ("model", "replica") else "right")
        for row in data["replicas"]:
            replicas.add_row(*(escape(_cell(v)) for v in row.values()))
        out.print(replicas)
    if data["pairs_by_source"]:
        sources = Table(title="pairs by source")
        sources.add_column("source")
        sources.add_column("pairs", justify="right")
        for source, n in data["pairs_by_source"].items():
            sources.add_row(escape(source), str(n))
        out.print(sources)
    for title, rows, skip in (("scorer diagnostics (latest run of each scorer)", data["scorer_diagnostics"],
                               ("scorer_id", "run_id")),
                              ("panels (latest run of each)", data["panels"], ("panel_id", "run_id")),
                              ("scorers against human labels (prefsynth review import)", data["human_accuracy"],
                               ("scorer_id",)),
                              ("replies cut off at max_tokens", data["truncation"], ()),
                              ("length control: chosen against rejected tokens, before and after",
                               data["length_control"], ())):  # fmt: skip
        if not rows:
            continue
        table = Table(title=title)
        keys = [k for k in rows[0] if k not in skip]
        for key in keys:
            table.add_column(key.replace("_", " "), justify="left" if key in ("scorer", "name", "model") else "right")
        for row in rows:
            table.add_row(*(_cell(row[k]) for k in keys))
        out.print(table)
    if data["prompt_versions"]:
        versions = Table(title="prompt versions (synthesis loops)")
        for col in ("version", "role", "round", "parent", "rounds", "pairs", "accepted", "rate", "text"):
            versions.add_column(col, justify="right" if col in ("round", "rounds", "pairs", "accepted", "rate")
                                else "left")  # fmt: skip
        for v in data["prompt_versions"]:
            versions.add_row(*(_cell(x) for x in (v["version_id"][:12], v["role"], v["round"],
                                                  (v["parent_id"] or "")[:12], v["rounds"], v["pairs"], v["accepted"],
                                                  v["acceptance_rate"], v["text"][:60])))  # fmt: skip
        out.print(versions)


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return escape(", ".join(map(str, value)))
    return escape(str(value))  # names like score[judge] are text, not rich markup


FORMAT_HELP = ("trl (train.parquet), jsonl (train.jsonl), openrlhf (openrlhf.jsonl), "
               "or sft (sft.jsonl: the teacher's anchors).")
MARGIN_HELP = "Write a `margin` column, which TRL's RewardTrainer trains with: none (default), raw, scaled, teacher."
SPLITS_HELP = ("Split by prompt into one file per split, e.g. train=0.9,test=0.1 (train, validation, test; "
               "fractions summing to 1).")  # fmt: skip
HUB_HELP = "Then push the files and card to this Hub dataset repo (ORG/NAME); needs HF_TOKEN and HF_HUB_OFFLINE=0."


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    db: Annotated[Path, typer.Option("--db", help=DB_HELP)] = Path("prefsynth.duckdb"),
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "trl",
    margin: Annotated[str, typer.Option("--margin", help=MARGIN_HELP)] = "none",
    run_id: Annotated[str | None, typer.Option("--run", help="A run id (default: the newest completed).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a dataset already in --out.")] = False,
    snapshot: Annotated[str | None, typer.Option("--snapshot", help="Write this snapshot again (an id or a "
                                                 "unique prefix, see `prefsynth datasets`).")] = None,  # fmt: skip
    splits: Annotated[str | None, typer.Option("--splits", help=SPLITS_HELP)] = None,
    seed: Annotated[int, typer.Option("--seed", help="The seed of the split draw.")] = 0,
    push_to_hub: Annotated[str | None, typer.Option("--push-to-hub", help=HUB_HELP)] = None,
    private: Annotated[bool, typer.Option("--private", help="--push-to-hub: create the repo private.")] = False,
) -> None:
    """Write the pairs of the latest completed run as a preference dataset, with its card (README.md).

    Example: prefsynth export --db prefsynth.duckdb --out exports/v1 --format trl --margin none

    Every row has `source` and `score_gap` (score_chosen - score_rejected). A `margin` column changes the
    reward-model objective (-logsigmoid(r_chosen - r_rejected - margin)), so it is written only with --margin:
    raw (= score_gap, in the scorer's units), scaled (score_gap / the largest gap of the same source and scorer:
    0-1), teacher (refinement pairs' calibrated gap, other rows 0). The card states each source's unit.

    --format sft writes no pairs but the run's teacher anchors (`teacher.anchors: true`) as SFT targets:
    `prompt` and `completion` message lists, which TRL's SFTTrainer reads, and their `finish_reason`.

    A folder that already holds this format's files is left alone unless --overwrite is given, which also
    deletes the files of this format that the export does not write (test.parquet of an earlier export with
    splits), so that no stale split is left; it says which. The warehouse must exist, and --run must name one
    of its runs.

    --splits train=0.9,test=0.1 splits by prompt (a prompt's pairs all in one split, drawn from a seeded hash
    of its id: --seed) into one file per split: train.parquet and test.parquet for trl (train.jsonl/test.jsonl,
    openrlhf_train.jsonl/..., sft_train.jsonl/...). The card states the splits, seed and counts.

    Every export is recorded as an immutable snapshot: its rows (and each row's split), margin mode, and the
    SHA-256 of its files and card. --snapshot ID writes that snapshot again (its format, margin and splits;
    --format, --margin, --run, --splits and --seed do not apply) and says whether the bytes are the same.

    --push-to-hub ORG/NAME then pushes the written files and card, unchanged, to that Hub dataset repo (with
    --private, a new repo is private), in one commit that also deletes the repo's files of this format that the
    export does not hold (an earlier push's). It needs a token (HF_TOKEN or `hf auth login`) and
    HF_HUB_OFFLINE=0; without them, or with a repo id the Hub refuses, it stops before writing anything. A push
    that fails (the network, the Hub) exits 2; the export stays written and recorded.
    """
    token, split_spec = _export_checks(push_to_hub, splits, seed, snapshot is not None)
    if snapshot is not None:
        return _export_snapshot(snapshot, out, db, overwrite, push_to_hub, private, token)
    from prefsynth.tasks.export import FILES, write_dataset
    from prefsynth.tasks.margins import MARGIN_MODES
    from prefsynth.warehouse.store import Store

    if fmt not in FILES:
        raise fail(PrefsynthError(f"--format must be one of {', '.join(FILES)}, got {fmt!r}"))
    if margin not in MARGIN_MODES:
        raise fail(PrefsynthError(f"--margin must be one of {', '.join(MARGIN_MODES)}, got {margin!r}"))
    try:
        with Store(db, create=False) as store:
            kind = store.run_kind(run_id) if run_id is not None else "synthesize"
            if kind is None:
                raise PrefsynthError(f"{db} has no run {run_id!r} (--run)")
            if kind != "synthesize":
                raise PrefsynthError(f"run {run_id!r} is a `prefsynth {kind}` run: it has no pairs to export (--run)")
            chosen_run, rows = store.export_rows(run_id, fmt)
            if chosen_run is None:
                raise PrefsynthError(f"{db} has no completed run to export")
            done = write_dataset(rows, out, fmt, overwrite, margin, store.card_scorers(rows), chosen_run, split_spec)
            store.record_snapshot(done.snapshot_id, chosen_run, fmt, str(done.path), margin, done.row_ids,
                                  done.file_sha256, done.card_sha256, done.counts, done.row_splits,
                                  done.splits)  # fmt: skip
    except PrefsynthError as err:
        raise fail(err) from None
    what = "anchors" if fmt == "sft" else "pairs"
    if done.n_pairs == 0:
        hint = " (a run with `teacher.anchors: true` has them)" if fmt == "sft" else ""
        console.print(f"[yellow]warning:[/] run {chosen_run} has no {what}{hint}; wrote an empty dataset")
    parts = "" if done.splits is None else " (" + ", ".join(f"{k} {v['rows']}" for k, v in
                                                             done.splits["files"].items()) + ")"  # fmt: skip
    print(f"{done.n_pairs} {what}{parts} from run {chosen_run} -> {done.path} (margin: {margin}); snapshot "
          f"{done.snapshot_id[:12]}")
    _removed(done)
    if push_to_hub is not None and token is not None:
        _push(done, push_to_hub, private, token)


def _export_checks(repo: str | None, splits: str | None, seed: int, snapshot: bool) -> tuple[str | None, object]:
    """Before any work: the Hub token (with --push-to-hub) and the --splits; (token, Splits or None)."""
    from prefsynth.backends.hub import hub_token
    from prefsynth.schemas.config import Splits, check_repo_id

    try:
        if repo is not None:
            try:
                check_repo_id(repo)
            except ValueError as err:
                raise PrefsynthError(f"--push-to-hub {err}") from None
        token = hub_token() if repo is not None else None
        if splits is None or snapshot:
            return token, None
        fractions = {}
        for part in splits.split(","):
            name, _, value = part.partition("=")
            try:
                fractions[name.strip()] = float(value)
            except ValueError:
                raise PrefsynthError(f"--splits: write NAME=FRACTION,..., e.g. train=0.9,test=0.1; got {splits!r}") \
                    from None
        try:
            return token, Splits(fractions=fractions, seed=seed)
        except ValueError as err:  # pydantic's ValidationError: its message is check_splits'
            raise PrefsynthError("--" + reason(err)) from None
    except PrefsynthError as err:
        raise fail(err) from None


def _removed(done: Exported) -> None:
    """Say which stale files of the format an --overwrite export deleted from its folder."""
    if done.removed:
        console.print(f"[yellow]note:[/] deleted {', '.join(done.removed)} from {done.files[0].parent}: an earlier "
                      "export's files of this format, which this one replaces (--overwrite)")  # fmt: skip


def _push(done: object, repo: str, private: bool, token: str) -> None:
    from prefsynth.backends.hub import push

    try:
        url, deleted = push(done, repo, private, token)  # type: ignore[arg-type]
    except PrefsynthError as err:
        raise fail(err) from None
    print(f"pushed to the Hub dataset {repo}: {url}")
    if deleted:
        console.print(f"[yellow]note:[/] the commit deletes {', '.join(deleted)} from {repo}: an earlier push's "
                      "files of this format, which this export replaces")  # fmt: skip


def _export_snapshot(snapshot: str, out: Path, db: Path, overwrite: bool, repo: str | None = None,
                     private: bool = False, token: str | None = None) -> None:  # fmt: skip
    """`export --snapshot`: the snapshot's rows again, in its format, margin mode and splits, checked by hash;
    pushed to `repo` only if the bytes are the recorded ones."""
    from prefsynth.schemas.config import Splits
    from prefsynth.tasks.export import write_dataset
    from prefsynth.warehouse.store import Store

    try:
        with Store(db, read_only=True) as store:
            found = store.snapshot(snapshot)
            if found is None:
                raise PrefsynthError(f"{db} has no snapshot {snapshot!r} (or the prefix names several): see "
                                     "`prefsynth datasets`")  # fmt: skip
            snap, rows = found
            if len(rows) != snap["n_pairs"]:
                raise PrefsynthError(f"snapshot {snap['snapshot_id'][:12]} had {snap['n_pairs']} rows; the warehouse "
                                     f"now holds {len(rows)} of them")  # fmt: skip
            recorded = json.loads(snap["splits"]) if snap.get("splits") else None
            splits = None if recorded is None else Splits(fractions=recorded["fractions"], seed=recorded["seed"])
            done = write_dataset(rows, out, snap["format"], overwrite, snap["margin"] or "none",
                                 store.card_scorers(rows), snap["run_id"], splits)  # fmt: skip
    except PrefsynthError as err:
        raise fail(err) from None
    same = done.file_sha256 == snap["file_sha256"] and done.card_sha256 == snap["card_sha256"]
    files = "files" if done.splits else "file"
    print(f"snapshot {snap['snapshot_id'][:12]}: {done.n_pairs} rows -> {done.path} ("
          + (f"byte-for-byte the same {files} and card)" if same else "the bytes differ from the recorded ones: "
             "another prefsynth, datasets or pyarrow version writes them differently)"))  # fmt: skip
    if not same and snap["file_sha256"] is None:
        console.print("[yellow]note:[/] this snapshot was exported before hashes were recorded")
    _removed(done)
    if repo is not None and token is not None:
        if not same:
            raise fail(PrefsynthError(f"not pushed to {repo}: the files written differ from the snapshot's"))
        _push(done, repo, private, token)


@app.command()
def datasets(db: Annotated[Path, typer.Option("--db", help=DB_HELP)] = Path("prefsynth.duckdb")) -> None:
    """List the exported snapshots: id, run, format, margin mode, rows per source and per split, file hash,
    path, time.

    Example: prefsynth datasets --db prefsynth.duckdb
    Write one again with `prefsynth export --snapshot ID --out DIR`.
    """
    from prefsynth.warehouse.store import Store

    try:
        with Store(db, read_only=True) as store:
            snaps = store.snapshots()
    except PrefsynthError as err:
        raise fail(err) from None
    table = Table(title=f"dataset snapshots in {db}")
    for col in ("snapshot", "run", "format", "margin", "rows", "per source", "splits", "sha256", "path", "created"):
        table.add_column(col, justify="right" if col == "rows" else "left")
    for s in snaps:
        table.add_row(s["snapshot_id"][:12], (s["run_id"] or "")[:12], s["format"], s["margin"] or "–",
                      str(s["n_pairs"]), s["counts"] or "–", _split_cell(s.get("splits")),
                      (s["file_sha256"] or "–")[:12], escape(s["path"]), str(s["created_at"])[:19])  # fmt: skip
    Console().print(table)


@app.command()
def report(
    out: Annotated[Path, typer.Option("--out", help="The HTML file to write.")],
    db: Annotated[Path, typer.Option("--db", help=DB_HELP)] = Path("prefsynth.duckdb"),
    run_id: Annotated[str | None, typer.Option("--run", help="A run id (default: the newest completed).")] = None,
) -> None:
    """Write one run as a self-contained HTML page: plots and tables, viewable offline.

    Example: prefsynth report --db prefsynth.duckdb --out report.html

    Plots: score distribution per scorer, margins of the curated pairs, reply length against score, chosen
    against rejected length before and after length control, pairwise judges' position consistency and panel
    agreement (where the run has them), and the pairs kept and dropped by each curation filter; then the most
    and least confident pairs with their texts. Styles and plots (SVG) are inline and the page runs no script.
    It reads the warehouse read-only, also while a run writes it.
    """
    from prefsynth.report import write_report

    try:
        data, path = write_report(db, out, run_id)
    except PrefsynthError as err:
        raise fail(err) from None
    print(f"report of run {data.run['run_id']} ({data.run['status']}, {len(data.pairs)} pairs) -> {path} "
          f"({path.stat().st_size / 1024:.0f} KiB)")


def _split_cell(recorded: str | None) -> str:
    """'train 18, test 2 (seed 0)' of a snapshot's splits JSON, or '–'."""
    if not recorded:
        return "–"
    splits = json.loads(recorded)
    return ", ".join(f"{k} {v['rows']}" for k, v in splits["files"].items()) + f" (seed {splits['seed']})"


@app.command("eval")
def eval_(
    config: Annotated[Path, typer.Option("--config", help="Config whose scorers to evaluate.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled pairs: a file (or an LLMBar folder).")],
    fmt: Annotated[str, typer.Option("--format", help="llmbar, hh-rlhf or rewardbench.")],
    limit: Annotated[int | None, typer.Option("--limit", help="Use the first N pairs.")] = None,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Measure how often each scorer of CONFIG prefers the human-labelled better reply.

    Example: prefsynth eval --config examples/cdr.yaml --data ../shared/data/llmbar/natural.json --format llmbar

    Reports accuracy (ties count as wrong), ties and accuracy per subset, and stores them in the warehouse
    (tables evals, eval_items; pairwise verdicts in judgments and comparisons). Several scorers in CONFIG
    give a side-by-side table. Pairwise judges always judge both orders here and also report
    position_consistency, first_position_rate, flipped, calls_per_pair and tokens_per_pair.
    """
    from prefsynth.flows.prefect_api import launching
    from prefsynth.tasks.labelled import FORMATS

    if fmt not in FORMATS:
        raise fail(PrefsynthError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}"))
    try:
        with launching():
            result = _evaluate(config, data, fmt, limit, db)
    except PrefsynthError as err:
        raise fail(err) from None
    from prefsynth.flows.evaluate import summary_frame

    if as_json:
        reports = list(result["scorers"].values())
        print(json.dumps({**reports[0], **result, "scorers": result["scorers"]}, sort_keys=True))
        return
    frame = summary_frame(result)
    table = Table(title=f"{result['pairs']} labelled pairs from {data}")
    for col in frame.columns:
        table.add_column(col, justify="left" if col == "scorer" else "right")
    for row in frame.iter_rows():
        table.add_row(*(_cell(v) for v in row))
    Console().print(table)


def _evaluate(config: Path, data: Path, fmt: str, limit: int | None, db: Path | None) -> dict:
    """Check the config and the labelled data (before local servers start and Prefect is imported), then run
    the eval flow."""
    from prefsynth.backends.local import require_local
    from prefsynth.flows.evaluate import evaluate
    from prefsynth.flows.prefect_api import prefect_api, using
    from prefsynth.schemas.config import load_config
    from prefsynth.tasks.labelled import load_labelled

    cfg = load_config(config)
    for model in cfg.all_models():
        if model.gguf:
            require_local(model.gguf)  # a missing `local` extra fails here
    load_labelled(data, fmt, limit)  # bad data fails here
    with prefect_api() as api, using(api), _Bars().shown():
        return evaluate(config=cfg, data=str(data), fmt=fmt, limit=limit, db=str(db) if db else None)


@app.command("score-text")
def score_text(
    prompt: Annotated[str, typer.Option("--prompt", help="The user turn.")],
    response: Annotated[str, typer.Option("--response", help="The reply to score.")],
    scorer: Annotated[str, typer.Option("--scorer", help="Scorer name or kind in the config.")] = "cdr",
    config: Annotated[Path | None, typer.Option("--config", help="Config (default: the embedded CDR pair).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Score one reply and show exactly what each model scored (no warehouse, no Prefect).

    Example: prefsynth score-text --scorer cdr --prompt "What is 2+2?" --response "4." --json

    For CDR: strong/weak log-probs and token counts, cdr_sum, cdr_mean, and the exact context and
    continuation strings. Without --config the embedded pair is used: SmolLM2-135M-Instruct (strong) over
    Gemma-3-270M base (weak), vanilla.
    """
    from prefsynth.tasks.score_text import score_one

    try:
        out = score_one(scorer, prompt, response, config)
    except PrefsynthError as err:
        raise fail(err) from None
    if as_json:
        print(json.dumps(out, ensure_ascii=False, sort_keys=True))
        return
    table = Table(title=f"{out['scorer']} ({out['kind']})", show_header=False)
    for key, value in out.items():
        table.add_row(key, escape(repr(value) if isinstance(value, str) else str(value)))
    Console().print(table)


from prefsynth.review_cli import review_app  # noqa: E402  (a sub-app in its own module)

app.add_typer(review_app, name="review")



def main() -> None:
    """The `prefsynth` command. Once it is done and the atexit handlers have run, the process ends without
    tearing down the interpreter: that takes half a second (extension modules' destructors) and does nothing
    a finished command needs. An uncaught exception ends it the usual way, with its traceback."""
    try:
        app()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if not isinstance(done.code, int | None):
            print(done.code, file=sys.stderr)
        # what the interpreter does first at exit: join non-daemon threads (after their executors' exit
        # hooks), then run the atexit handlers
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
