"""An endpoint model's `revision` is its cache identity: a new revision is called again (and the user is told),
a server that moves keeps its cache. The endpoint is the real llama.cpp server, reached over its URL."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import prefsynth
from prefsynth.backends.local import LocalServers
from prefsynth.schemas.config import ModelSpec

pytestmark = pytest.mark.model
PROMPTS = ["Name a colour.", "Name a fruit."]


def _config(tmp_path: Path, base_url: str, revision: str) -> dict:
    model = {"base_url": base_url, "model": "smollm2", "revision": revision, "server": "llama-cpp",
             "max_concurrency": 1}
    return {"generation": {"models": [model], "samples_per_prompt": 2,
                           "sampling": {"temperature": 1.0, "max_tokens": 8, "seed": 5}},
            "scorers": [{"kind": "pointwise_judge", "model": model, "max_tokens": 40}],
            "curation": {"min_margin": 0, "allow_truncated": True},
            "warehouse": str(tmp_path / "w.duckdb")}  # fmt: skip


def test_a_new_revision_is_called_again_and_a_moved_server_is_not(tmp_path: Path, prefect_harness) -> None:
    with LocalServers() as servers:
        url = servers.endpoint(ModelSpec(gguf="smollm2-135m-instruct")).base_url
        first = prefsynth.run(_config(tmp_path, url, "r1"), prompts=PROMPTS)
        assert first.status == "completed" and not first.summary.failures, "precondition: the first run scored"
        assert first.summary.model_calls >= 2 * len(PROMPTS) * 2

        moved = url.replace("127.0.0.1", "localhost")
        assert moved != url
        assert prefsynth.run(_config(tmp_path, moved, "r1"), prompts=PROMPTS).summary.model_calls == 0

        warnings: list[logging.LogRecord] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = warnings.append  # type: ignore[method-assign]
        logging.getLogger("prefect.flow_runs").addHandler(handler)
        try:
            new = prefsynth.run(_config(tmp_path, url, "r2"), prompts=PROMPTS)
            assert new.summary.model_calls == first.summary.model_calls
            assert any("model smollm2: revision r2 is new here (was r1)" in r.getMessage() for r in warnings)
            warnings.clear()
            back = prefsynth.run(_config(tmp_path, url, "r1"), prompts=PROMPTS)  # its answers are all cached
            assert back.summary.model_calls == 0 and not [r for r in warnings if "revision" in r.getMessage()]
        finally:
            logging.getLogger("prefect.flow_runs").removeHandler(handler)


def test_revision_is_only_for_endpoints() -> None:
    with pytest.raises(ValueError, match="`revision` is for endpoint models"):
        ModelSpec(gguf="smollm2-135m-instruct", revision="x")
    assert ModelSpec(base_url="http://a/v1", model="m").identity == "http://a/v1#m"
    assert ModelSpec(base_url="http://a/v1", model="m", revision="7").identity == "m@7"
