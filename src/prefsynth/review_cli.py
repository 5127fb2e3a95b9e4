"""`prefsynth review`: send the doubtful pairs of a run to people (Argilla, Label Studio) and bring their verdicts
back as the scorer `human` (tasks/review.py says how doubt is ranked and what verdicts do)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from prefsynth.cli_common import console, fail
from prefsynth.errors import PrefsynthError

review_app = typer.Typer(help="Human review: export the most doubtful pairs to Argilla or Label Studio, import "
                         "people's verdicts as the scorer `human`.", no_args_is_help=True)  # fmt: skip
DB = Annotated[Path, typer.Option("--db", help="DuckDB warehouse file.")]


@review_app.command("export")
def export(
    budget: Annotated[int, typer.Option("--budget", help="How many pairs to send (the N most doubtful).")],
    tool: Annotated[str, typer.Option("--format", help="argilla (a Dataset.to_disk folder) or label-studio "
                                      "(tasks.json and label_config.xml).")],  # fmt: skip
    out: Annotated[Path, typer.Option("--out", help="Output folder (must not hold these files yet).")],
    by: Annotated[str, typer.Option("--by", help="Doubt: agreement (of the other scorers), margin (calibrated, "
                                    "z), flips (pairwise verdicts that reversed with the order), or auto.")] = "auto",
    run_id: Annotated[str | None, typer.Option("--run", help="A run id (default: the newest completed).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the left/right sides.")] = 0,
    db: DB = Path("prefsynth.duckdb"),
) -> None:
    """Write the BUDGET most doubtful pairs of a run as files Argilla or Label Studio import.

    Example: prefsynth review export --budget 50 --format label-studio --out review/ls --by auto

    Only the run's curated pairs that no one has labelled yet are candidates. --by auto ranks by verdict flips
    (when the run has pairwise comparisons), then by the other scorers' agreement (when there are others), then
    by the calibrated margin (gap / the scorer's standard deviation over the run); ties go to the pair id. Each
    pair's machine-chosen response is shown left or right by a seeded hash (--seed); the mapping is stored in
    the warehouse (review_tasks), and each task carries its task_id.

    argilla: OUT holds records.json and .argilla/ (load it with rg.Dataset.from_disk(OUT)); label-studio: OUT
    holds tasks.json (import it into a project) and label_config.xml (the project's labelling interface).
    """
    from prefsynth.tasks.review import check_options, doubt, rank, review_tasks
    from prefsynth.tasks.review_formats import conversation, write
    from prefsynth.warehouse.store import Store

    try:
        check_options(by, budget, tool)  # before the warehouse is opened
        with Store(db, create=False) as store:
            run = store.pipeline_run(run_id)
            pairs, values, comparisons = store.review_inputs(run)
            if pairs.is_empty():
                raise PrefsynthError(f"run {run} has no pairs that people have not labelled yet")
            tasks = review_tasks(rank(doubt(pairs, values, comparisons), by), budget, by, seed, tool, run)
            shown = store.review_texts([t.pair_id for t in tasks])  # the texts of the pairs sent, no others
            texts = {r["pair_id"]: {"prompt": conversation(r["prompt_messages"]), "chosen": r["chosen_text"],
                                    "rejected": r["rejected_text"]} for r in shown.iter_rows(named=True)}  # fmt: skip
            files = write(tool, out, tasks, texts, f"prefsynth-review-{tasks[0].review_id[:12]}")
            store.record_review(run, tasks)
    except PrefsynthError as err:
        raise fail(err) from None
    if len(tasks) < budget:
        console.print(f"[yellow]note:[/] run {run} has only {len(tasks)} unlabelled pairs (--budget {budget})")
    sides = Counter(t.chosen_side for t in tasks)
    print(f"{len(tasks)} pairs of run {run} by {by} -> {tool}: " + ", ".join(str(f) for f in files)
          + f" (review {tasks[0].review_id[:12]}; chosen shown left {sides['left']}, right {sides['right']})")


@review_app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="Label Studio's JSON export, or Argilla's to_disk folder (or its "
                                         "records.json).")],  # fmt: skip
    db: DB = Path("prefsynth.duckdb"),
) -> None:
    """Bring people's verdicts back as the scorer `human`: who, when and from which file.

    Example: prefsynth review import project-1-at-2026-11-28.json --db prefsynth.duckdb

    Accepts what the tools export after labelling: Label Studio's JSON export (each task's `annotations`: the
    Pairwise selection, the tie choice, or a skip) and Argilla's `dataset.to_disk` folder (each record's
    `preference` responses). Each task must be one `prefsynth review export` wrote into this warehouse. A file
    imported again adds nothing. The next run's curation lets the verdicts override the machine's
    (`curation.human_override`), and `prefsynth stats` shows every scorer's accuracy against them.
    """
    from prefsynth.schemas.records import HumanLabel
    from prefsynth.tasks.review import HUMAN_CONFIG, HUMAN_ID, labels
    from prefsynth.tasks.review_formats import read_export
    from prefsynth.warehouse.ids import canonical_json, content_id
    from prefsynth.warehouse.store import Store

    try:
        tool, file, sha, verdicts = read_export(path)
        if not verdicts:
            raise PrefsynthError(f"{file} has no verdicts yet: export it from {tool} after people labelled")
        with Store(db, create=False) as store:
            tasks = store.review_tasks([v["task_id"] for v in verdicts])
            unknown = [v["task_id"] for v in verdicts if v["task_id"] not in tasks]
            if unknown:
                raise PrefsynthError(f"{file}: task {unknown[0]} is not one that `prefsynth review export` wrote into "
                                     f"{db} ({len(set(unknown))} unknown tasks): import it into the warehouse it "
                                     "came from")  # fmt: skip
            other = {t["tool"] for t in tasks.values()} - {tool}
            if other:
                raise PrefsynthError(f"{file} is a {tool} export, but its tasks were exported for {other.pop()}")
            rows: list[HumanLabel] = labels(verdicts, tasks, str(file), sha, tool)
            run = content_id("review-import", sha)  # the same file is the same import: nothing new the second time
            if store.run_kind(run) is None:
                store.begin_run(run, "review import", canonical_json({"file": str(file), "sha256": sha, "tool": tool}),
                                None, kind="review")  # fmt: skip
            store.register_scorer(HUMAN_ID, "human", "human", canonical_json(HUMAN_CONFIG))
            new = store.write_labels(run, rows)
            store.end_run(run, "completed", {"labels": len(rows), "file": str(file), "tool": tool})
    except PrefsynthError as err:
        raise fail(err) from None
    verdict = Counter(r.verdict for r in rows)
    print(f"{len(rows)} verdicts ({new} new) from {file} ({tool}) by {len({r.annotator for r in rows})} "
          "annotators: " + ", ".join(f"{k} {verdict[k]}" for k in ("chosen", "rejected", "tie", "skip")))
