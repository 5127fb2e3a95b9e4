"""prefsynth: preference-data synthesis into a DuckDB warehouse, orchestrated by Prefect.

    import prefsynth
    result = prefsynth.run("config.yaml", prompts=["Name a prime."])   # -> RunResult (.pairs, .dataset)
    prefsynth.score({"kind": "pointwise_judge", "model": {...}}, [("Say hi.", "Hi!")])   # -> polars frame
    prefsynth.Warehouse("prefsynth.duckdb").pairs()                    # -> polars frame

Names load on first use, so `import prefsynth` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["PipelineConfig", "RunResult", "Warehouse", "run", "score"]

if TYPE_CHECKING:
    from prefsynth.api import RunResult, run, score
    from prefsynth.schemas.config import PipelineConfig
    from prefsynth.warehouse.reader import Warehouse

_WHERE = {"run": "prefsynth.api", "score": "prefsynth.api", "RunResult": "prefsynth.api",
          "PipelineConfig": "prefsynth.schemas.config", "Warehouse": "prefsynth.warehouse.reader"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'prefsynth' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
