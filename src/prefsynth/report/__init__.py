"""`prefsynth report`: one run of the warehouse as a self-contained HTML page (page.py, plots.py), and the same
numbers as Prefect artifacts (summary.py)."""

from __future__ import annotations

from pathlib import Path

from prefsynth.errors import PrefsynthError
from prefsynth.warehouse.report import ReportData, report_data
from prefsynth.warehouse.store import Store


def write_report(db: str | Path, out: str | Path, run_id: str | None = None) -> tuple[ReportData, Path]:
    """Read run `run_id` (default: the newest completed) read-only, also while a run writes the warehouse, and
    write its page to `out`. Returns the data shown and the path written."""
    from prefsynth.report.page import render  # matplotlib: only here, not in the flow's import

    with Store(db, read_only=True) as store:
        data = report_data(store, run_id)
    text = render(data)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as err:
        raise PrefsynthError(f"cannot write the report to {out}: {err.strerror}") from None
    return data, out
