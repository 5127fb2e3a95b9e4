"""prefsynth: preference-data synthesis into a DuckDB warehouse, orchestrated by Prefect."""

__version__ = "0.1.0"
