"""``multitune report``: every section from real tiny runs, rendered in headless Chromium; left-out sections;
errors for a directory that is not a run."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from multitune.cli import main
from multitune.config import parse_config
from multitune.errors import MultituneError
from multitune.reporting import write_report
from multitune.training import train
from tests.conftest import toy_config, write_toy_data

TASKS = ("sentiment", "ner", "similarity")


def _matrix(values: list[list[float | None]]) -> dict:
    return {i: {j: values[a][b] for b, j in enumerate(TASKS)} for a, i in enumerate(TASKS)}


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def multitask_run(tmp_path_factory, tiny_backbone) -> Path:
    """A real 3-task run with PCGrad (gradient statistics), plus what an affinity probe and an adaptive sampler
    log, written by hand in their record formats."""
    base = tmp_path_factory.mktemp("report-multitask")
    raw = toy_config(write_toy_data(base / "data"), tiny_backbone, base / "run", max_steps=8, eval_every=4,
                     log_every=2)
    raw["tasks"] = {k: raw["tasks"][k] for k in TASKS}
    raw["loss_weighting"] = {"strategy": "pcgrad"}
    train(parse_config(raw), progress=False)
    run = base / "run"
    _append(run / "metrics.jsonl", [
        {"kind": "affinity", "step": 4, "seconds": 0.2,
         "cosine": _matrix([[1.0, 0.3, -0.2], [0.3, 1.0, 0.1], [-0.2, 0.1, 1.0]]),
         "tag": _matrix([[0.05, 0.01, -0.02], [0.02, 0.04, None], [-0.01, 0.0, 0.03]])},
        {"kind": "affinity", "step": 8, "seconds": 0.2,
         "cosine": _matrix([[1.0, 0.5, -0.4], [0.5, 1.0, 0.2], [-0.4, 0.2, 1.0]]),
         "tag": _matrix([[0.04, 0.02, -0.03], [0.01, 0.05, 0.01], [-0.02, 0.01, 0.02]])},
        {"kind": "sampling", "step": 4, "shares": {"sentiment": 0.5, "ner": 0.25, "similarity": 0.25},
         "reasons": {"sentiment": "lags reference 0.5 < 0.9"}},
    ])
    return run


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory, tiny_backbone) -> Path:
    """A real AdapterFusion run: two stages (per-task adapters, then fusion), so a forgetting matrix, adapters
    with fusion attention, and per-stage metrics and parameter tables."""
    base = tmp_path_factory.mktemp("report-fusion")
    raw = toy_config(write_toy_data(base / "data"), tiny_backbone, base / "run", learning_rate=5e-3, max_steps=4,
                     eval_every=2, log_every=1)
    raw["tasks"] = {k: raw["tasks"][k] for k in TASKS}
    raw["adapters"] = {"method": "bottleneck", "arrangement": "fusion", "fusion_targets": ["sentiment"],
                       "fusion_steps": 3, "fusion_learning_rate": 1e-2}
    train(parse_config(raw), progress=False)
    return base / "run"


# -- rendering ------------------------------------------------------------------------------------------

# added to a copy of the page (the report itself has no script): marks each image once the page has loaded
CHECK_IMAGES = ("<script>window.addEventListener('load', () => { for (const img of document.images) "
                "img.setAttribute('data-ok', String(img.complete && img.naturalWidth > 0)); "
                "document.body.setAttribute('data-loaded', 'yes'); });</script>")


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome",
                                               "google-chrome-stable")) if p), None)


class _Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections: list[str] = []
        self.images: list[dict] = []
        self.body: dict = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "body":
            self.body = attrs


def render(page: Path, tmp: Path) -> _Dom:
    """The DOM of ``page`` after Chromium loaded it (headless), with each image's ``data-ok``."""
    exe = chromium()
    if exe is None:
        pytest.skip("no chromium binary found (apt-get install chromium): the report page is not rendered")
    copy = tmp / "rendered.html"
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECK_IMAGES + "</body>"), encoding="utf-8")
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                           f"--user-data-dir={tmp / 'chromium-profile'}", "--dump-dom", copy.as_uri()],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dom = _Dom()
    dom.feed(proc.stdout)
    assert dom.body.get("data-loaded") == "yes", "the page did not finish loading"
    return dom


def check_page(run: Path, sections: set[str]):
    """Write the report of ``run`` and check its sections, and that it is self-contained."""
    report = write_report(run)
    assert report.path == run / "report.html"
    assert set(report.sections) == sections
    page = report.path.read_text(encoding="utf-8")
    # self-contained: no script, no stylesheet link, nothing fetched (every src/href is data: or an anchor)
    assert "<script" not in page and "<link" not in page
    assert all(ref.startswith(("data:image/png;base64,", "#")) for ref in re.findall(r'(?:src|href)="([^"]*)"', page))
    return report


def check_rendering(report, tmp: Path) -> None:
    """Chromium shows every section and decodes every image, and each image is its PNG in RUN/report/."""
    dom = render(report.path, tmp)
    assert dom.sections == [*report.sections, "omitted"]
    assert len(dom.images) == len(report.figures) > 0
    for img, png in zip(dom.images, report.figures):
        assert img["data-ok"] == "true", f"{img.get('alt')} did not decode"
        assert base64.b64decode(img["src"].split(",", 1)[1]) == png.read_bytes()
        assert png.parent == report.path.parent / "report" and img["data-file"] == f"report/{png.name}"


def test_report_of_a_multitask_run_renders_every_section(multitask_run, tmp_path):
    report = check_page(multitask_run, {"config", "metrics", "curves", "loss-weights", "sampling", "grad-stats",
                                        "confusion", "affinity", "parameters"})
    page = report.path.read_text(encoding="utf-8")
    assert "lags reference 0.5 &lt; 0.9" in page  # the adaptive sampler's reason, escaped
    assert "pcgrad" in page and "classification" in page  # config summary: loss weighting, task types
    names = {p.name for p in (multitask_run / "report").glob("*.png")}
    assert names == {"learning_curves.png", "loss_weights.png", "sampling_shares.png", "grad_stats.png",
                     "confusion_sentiment.png", "affinity.png", "affinity_over_time.png"}
    assert set(report.omitted) == {"forgetting", "adapters"}
    assert all(f"<td>{why}</td>" in page.replace("&#x27;", "'") for why in report.omitted.values())
    check_rendering(report, tmp_path)


def test_report_of_a_sequential_fusion_run_renders_every_section(fusion_run, tmp_path):
    report = check_page(fusion_run, {"config", "metrics", "curves", "loss-weights", "sampling", "confusion",
                                     "forgetting", "adapters", "parameters"})
    page = report.path.read_text(encoding="utf-8")
    assert "stage 01-adapters" in page and "stage 02-fusion" in page  # curves and parameters per stage
    names = {p.name for p in (fusion_run / "report").glob("*.png")}
    assert {"forgetting.png", "fusion_attention.png", "learning_curves-01-adapters.png",
            "learning_curves-02-fusion.png"} <= names
    check_rendering(report, tmp_path)


# -- without a browser -----------------------------------------------------------------------------------

def test_sections_without_data_are_left_out_with_the_reason(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"validation": {"a": {"accuracy": 0.5}}}))
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 2, "metrics": {"a": {"accuracy": 0.5}}})
                                       + "\n")
    (run / "report").mkdir()
    (run / "report" / "grad_stats.png").write_bytes(b"from an earlier report")
    report = write_report(run, tmp_path / "elsewhere.html")
    assert report.path == tmp_path / "elsewhere.html" and not (run / "report.html").exists()
    assert report.sections == ["metrics", "curves"]
    assert set(report.omitted) == {"config", "loss-weights", "sampling", "grad-stats", "confusion", "forgetting",
                                   "affinity", "adapters", "parameters"}
    assert "config.yaml is missing" in report.omitted["config"]
    page = report.path.read_text(encoding="utf-8")
    assert '<section id="omitted">' in page and "parameters.json is missing" in page
    assert [p.name for p in (run / "report").iterdir()] == ["learning_curves.png"]  # the stale plot is gone


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(MultituneError, match="no such directory"):
        write_report(tmp_path / "missing")
    with pytest.raises(MultituneError, match=r"not a run directory: results.json is missing"):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(MultituneError, match=r"not a run directory: metrics.jsonl is missing"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl is missing" in err
    assert not (tmp_path / "report.html").exists()


def test_cli_writes_the_report(multitask_run, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert main(["report", str(multitask_run), "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report"] == str(out) and out.is_file()
    assert "affinity" in printed["sections"] and "forgetting" in printed["omitted"]
