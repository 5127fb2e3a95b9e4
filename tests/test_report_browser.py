"""`prefsynth report` in a real browser: Debian's headless Chromium renders the page; the rendered layout and a
screenshot show every plot drawn (non-zero size, marks inside, not one colour), and a recording proxy shows the
page tries no request. `make test` installs /usr/bin/chromium when it is missing."""

from __future__ import annotations

import html
import json
import re
import shutil
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefsynth.report import write_report
from tests.conftest import small_config, write_jsonl
from tests.test_report import _made

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--force-device-scale-factor=1"]  # fmt: skip
WIDTH = 1200
# Chromium's own background traffic (network time, component updates, sign-in) that its flags do not all stop;
# the page's requests are the others (and test_report.py checks the HTML references nothing outside itself)
OWN = re.compile(r"^\S+ (https?://)?[\w.-]*\.(google\.com|googleapis\.com|gvt1\.com)[:/]")
# run inside a copy of the page (without its Content-Security-Policy, which forbids scripts): where each plot lies
# and how many of its marks (paths, rects, glyph uses) have a non-zero rendered size
PROBE = """<script>
const plots = [...document.querySelectorAll('figure.plot')].map(f => {
  const svg = f.querySelector('svg'), r = svg.getBoundingClientRect();
  const marks = [...svg.querySelectorAll('path, rect, use')].filter(e => {
    const b = e.getBoundingClientRect(); return b.width > 0 || b.height > 0; }).length;
  return {id: f.id, x: r.x + scrollX, y: r.y + scrollY, w: r.width, h: r.height, marks};
});
const pre = document.createElement('pre'); pre.id = 'probe';
pre.textContent = JSON.stringify({plots, height: document.documentElement.scrollHeight});
document.body.appendChild(pre);
</script>"""


class _Recorder(socketserver.ThreadingTCPServer):
    """A proxy that records the first line of every request sent to it and answers 404."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.requests: list[str] = []
        recorder = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(4096).decode("latin-1").strip()
                if line:
                    recorder.requests.append(line)
                self.wfile.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def proxy() -> Iterator[_Recorder]:
    server = _Recorder()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def chromium(tmp: Path, page: Path, *args: str, proxy: _Recorder | None = None) -> str:
    """Run headless Chromium on a local file; its stdout. Every request goes through `proxy` when given."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium), or deselect "
                    "-m 'not browser'", pytrace=False)  # fmt: skip
    routed = [f"--proxy-server=http://127.0.0.1:{proxy.server_address[1]}", "--proxy-bypass-list=<-loopback>"] \
        if proxy else []  # fmt: skip
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    done = subprocess.run([CHROMIUM, *FLAGS, *routed, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def rendered(tmp: Path, page: Path) -> dict:
    """Where the browser laid out each plot, and how many of its marks it drew."""
    text = page.read_text(encoding="utf-8")
    probe = tmp / "probe.html"
    probe.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", text)
                     .replace("</body>", PROBE + "</body>"), encoding="utf-8")  # fmt: skip
    dom = chromium(tmp, probe, "--dump-dom", "--window-size=1200,900")
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe did not run: " + dom[-500:]
    return json.loads(html.unescape(found.group(1)))


def check_drawn(tmp: Path, page: Path, proxy: _Recorder, expected: set[str]) -> dict:
    """Every expected plot has a size and marks in the DOM and colours in a screenshot; no request is tried."""
    from PIL import Image

    layout = rendered(tmp, page)
    plots = {p["id"].removeprefix("plot-"): p for p in layout["plots"]}
    assert expected <= set(plots), f"missing plots: {expected - set(plots)}"
    for name, p in plots.items():
        assert p["w"] > 100 and p["h"] > 50 and p["marks"] >= 10, (name, p)
    shot = tmp / "shot.png"
    height = min(int(layout["height"]) + 50, 16000)
    chromium(tmp, page, f"--screenshot={shot}", f"--window-size={WIDTH},{height}", proxy=proxy)
    image = Image.open(shot).convert("RGB")
    assert len(image.getcolors(1 << 24) or []) > 20  # not a blank (single-colour) page
    for name, p in plots.items():
        if p["y"] + p["h"] > height:
            continue  # below a very long page's screenshot
        crop = image.crop((int(p["x"]), int(p["y"]), int(p["x"] + p["w"]), int(p["y"] + p["h"])))
        colours = crop.getcolors(1 << 24) or []
        inked = sum(n for n, c in colours if c != (255, 255, 255))
        assert len(colours) > 5 and inked / (crop.width * crop.height) > 0.01, (name, len(colours), inked)
    tried = [r for r in proxy.requests if not OWN.match(r)]
    assert tried == [], f"the page tried the network: {tried}"
    return plots


def test_the_proxy_sees_a_page_that_fetches(tmp_path: Path, proxy: _Recorder):
    """The network check can fail: a page with a remote image is seen trying it."""
    page = tmp_path / "fetches.html"
    page.write_text('<html><body><img src="http://example.invalid/x.png"></body></html>')
    chromium(tmp_path, page, f"--screenshot={tmp_path / 's.png'}", "--window-size=400,300", proxy=proxy)
    assert any("example.invalid" in r for r in proxy.requests), proxy.requests


def test_a_hand_made_report_renders_offline(tmp_path: Path, proxy: _Recorder):
    _, page = write_report(_made(tmp_path / "made.duckdb"), tmp_path / "report.html")
    plots = check_drawn(tmp_path, page, proxy, {"scores", "margins", "length-score", "lengths", "filters"})
    assert "judges" not in plots and "panel-alpha" not in plots  # no pairwise judge, no panel: said in words


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, prefect_harness):
    """A small run on the embedded SmolLM2: a pointwise and a pairwise judge, their panel, length control."""
    from prefsynth.flows.synthesize import synthesize

    tmp = tmp_path_factory.mktemp("report")
    prompts = write_jsonl(tmp / "p.jsonl", ["Name a fruit that is red.", "Say hello in French.",
                                            "Give one tip for sleeping well."])  # fmt: skip
    judge = {"gguf": "smollm2-135m-instruct"}
    config = small_config(  # 6 replies, 6 pointwise and 6 pairwise judge calls (3 comparisons, both orders)
        tmp, prompts, generation={"models": [judge], "samples_per_prompt": 2,
                                  "sampling": {"temperature": 1.0, "max_tokens": 16, "seed": 1}},
        scorers=[{"kind": "pointwise_judge", "name": "judge", "model": judge, "max_tokens": 48},
                 {"kind": "pairwise_judge", "name": "pairwise", "model": judge, "balanced_position": True,
                  "max_tokens": 24}],
        panel={"name": "panel"}, curation={"scorer": "panel", "rule": "above_margin", "max_length_ratio": 1.3,
                                           "min_margin": "auto"})  # fmt: skip
    summary = synthesize(config=config)
    assert summary.pairs > 0, "the run made no pairs: nothing below would be checked"  # the precondition
    return config, summary


@pytest.mark.model
def test_a_real_run_report_renders_its_plots_in_chromium(real_run, tmp_path: Path, proxy: _Recorder):
    config, summary = real_run
    data, page = write_report(config.warehouse, tmp_path / "report.html")
    assert data.run["run_id"] == summary.run_id and len(data.pairs) == summary.pairs
    assert not data.comparisons.is_empty() and not data.panels.is_empty()  # the judges and panel sections have data
    assert summary.lengths["length_control"] and summary.lengths["before"]["pairs"] >= summary.lengths["after"]["pairs"]
    size = page.stat().st_size
    assert size < 1_000_000, size
    plots = check_drawn(tmp_path, page, proxy, {"scores", "margins", "length-score", "lengths", "judges",
                                                "panel-alpha", "filters"})  # fmt: skip
    print(f"report: {size / 1024:.0f} KiB, plots {sorted(plots)}")
    # the flow published the same summary as Prefect artifacts: a table per scorer and a markdown report
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = {key: client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
                 for key in ("prefsynth-report", "prefsynth-report-scorers")}  # fmt: skip
    assert any(f"# Report of run {summary.run_id}" in a.data and "## Pairwise judges" in a.data
               and "| pairwise |" in a.data for a in found["prefsynth-report"])  # fmt: skip
    tables = [json.loads(a.data) for a in found["prefsynth-report-scorers"] if summary.run_id in (a.description or "")]
    assert tables and {row["scorer"] for row in tables[-1]} == {"judge", "pairwise", "panel"}
