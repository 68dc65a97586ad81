"""The docs work as printed. docs/tutorial.md: every ```bash block runs, in order, in one empty folder; the
README's example config is the file it names; every link between the pages (and to a heading) lands.

The blocks run as a reader would type them: ``bash -e`` in a temporary folder, with this environment's
``multitune`` and ``python`` first on PATH, offline. A block after ``<!-- tutorial-test: background -->`` (the
server) is started in the background, waited for until it answers, and stopped after the next block (the
request to it); ``<!-- tutorial-test: skip -->`` leaves a block out. Every block runs even when an earlier one
failed, so one run reports every broken step. Trains the real packaged backbone for the tutorial's own 80 (+40)
steps: a few minutes on 2 CPU cores.

    pytest -m integration tests/test_tutorial.py
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

TUTORIAL = REPO / "docs" / "tutorial.md"
_BLOCK = re.compile(r"(?:<!-- tutorial-test: (?P<mark>\w+) -->\n)?```(?:bash|sh)\n(?P<code>.*?)```", re.S)
_PORT = "8000"  # the port the tutorial's server and requests use; the test puts a free one in its place


@dataclass
class Block:
    code: str
    mark: str | None  # None, "background" or "skip"
    line: int  # of the opening fence in the markdown, for messages


def tutorial_blocks(text: str) -> list[Block]:
    """The shell blocks of a markdown page, in order, with their marks."""
    blocks = []
    for m in _BLOCK.finditer(text):
        fence = m.start("code") - 1
        blocks.append(Block(m.group("code"), m.group("mark"), text.count("\n", 0, fence) + 1))
    return blocks


def test_blocks_are_found_with_their_marks():
    text = ("intro\n```bash\necho one\n```\n```text\nnot run\n```\n<!-- tutorial-test: background -->\n"
            "```bash\nserve\n```\n<!-- tutorial-test: skip -->\n```sh\nrm -rf /\n```\n")
    blocks = tutorial_blocks(text)
    assert [(b.code, b.mark, b.line) for b in blocks] == [("echo one\n", None, 2), ("serve\n", "background", 9),
                                                          ("rm -rf /\n", "skip", 13)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="200")
    return env


def _wait_until_answering(port: int, server: subprocess.Popen, seconds: float = 300) -> str | None:
    """None once GET /health answers, else what went wrong."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return f"the server exited with status {server.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return None
        except OSError:
            pass
        time.sleep(1)
    return f"no answer on port {port} within {seconds:.0f} s"


def _stop(server: subprocess.Popen) -> str:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    return server.stdout.read() if server.stdout else ""


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _check(code: str, out: str, err: str, folder: Path) -> None:
    """What the tutorial says a command prints or writes, where it matters (AssertionError otherwise)."""
    if code.startswith("multitune --version"):
        assert out.startswith("multitune "), out
    elif code.startswith("multitune train shop.yaml --resume"):
        results = json.loads((folder / "shop-model" / "results.json").read_text(encoding="utf-8"))
        assert results["train"]["steps"] == 120, results["train"]
    elif code.startswith("multitune train shop.yaml"):
        assert (folder / "shop-model" / "model" / "multitune.json").is_file()
        assert re.search(r"next: multitune evaluate \S*shop-model\n", out + err), "train prints no next commands"
    elif code.startswith("multitune evaluate"):
        test = json.loads(out)["test"]
        assert "accuracy" in test["reviews"] and "f1" in test["orders"], test
    elif "multitune predict shop-model --task reviews --input" in code:
        lines = _json_lines(out)
        assert [x["input"] for x in lines] == ["The blanket is lovely and arrived early.",
                                               "Still no refund after three weeks."], lines
        assert all(x["label"] in ("negative", "positive") for x in lines), lines
    elif code.startswith("multitune predict shop-model --task reviews"):
        lines = _json_lines(out)
        assert [x["input"] for x in lines] == ["The lamp arrived broken and nobody replied.",
                                               "Lovely mug, and it came a day early."], lines
    elif code.startswith("multitune predict shop-model --task orders"):
        (line,) = _json_lines(out)
        text = line["input"]
        assert line["tokens"] == text.split() and len(line["tags"]) == len(line["tokens"]), line
        for entity in line["entities"]:
            assert text[entity["start"]:entity["end"]] == entity["text"], entity
    elif code.startswith("multitune export"):
        assert json.loads(out)["source"] in ("per-task-best", "final")
        assert (folder / "reviews-model" / "config.json").is_file()
    elif "pipeline(" in code:
        assert "'label'" in out, out
    elif code.startswith("curl"):
        (prediction,) = json.loads(out)["predictions"]
        assert set(prediction) == {"reviews", "orders"}, prediction
    elif "multitune.load" in code:
        assert "'label'" in out and "'CITY'" in out, out


@pytest.mark.integration
def test_tutorial_runs_as_printed(tmp_path):
    blocks = tutorial_blocks(TUTORIAL.read_text(encoding="utf-8"))
    assert any(b.mark == "background" for b in blocks), "the tutorial's server block lost its mark"
    port, env = _free_port(), _environment()
    failures: list[str] = []
    server: subprocess.Popen | None = None
    for block in blocks:
        if block.mark == "skip":
            continue
        code = block.code.replace(f"localhost:{_PORT}", f"localhost:{port}").replace(f"--port {_PORT}",
                                                                                     f"--port {port}")
        where = f"docs/tutorial.md:{block.line}"
        if block.mark == "background":
            server = subprocess.Popen(["bash", "-e", "-c", code], cwd=tmp_path, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            problem = _wait_until_answering(port, server)
            if problem:
                failures.append(f"{where}: {problem}\n{_stop(server)[-3000:]}")
                server = None
            continue
        start = time.monotonic()
        done = subprocess.run(["bash", "-e", "-c", code], cwd=tmp_path, env=env, text=True, capture_output=True,
                              timeout=1800)
        print(f"{where}: {time.monotonic() - start:.1f} s, exit {done.returncode}: {code.splitlines()[0][:80]}")
        if done.returncode != 0:
            failures.append(f"{where}: exit {done.returncode}\n{code[:300]}\n{done.stderr[-3000:]}")
        else:
            try:
                _check(code, done.stdout, done.stderr, tmp_path)
            except (AssertionError, ValueError, KeyError, OSError) as exc:
                failures.append(f"{where}: {type(exc).__name__}: {str(exc)[:1500]}\n{code[:300]}")
        if server is not None:  # the block after the server's talked to it: stop it
            log = _stop(server)
            if "Traceback" in log:
                failures.append(f"{where}: the server logged a traceback\n{log[-3000:]}")
            server = None
    if server is not None:
        _stop(server)
    assert not failures, "\n\n".join(failures)


def test_readme_example_is_the_config_it_names():
    """The README's YAML example is, byte for byte, the example config its first line runs."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    examples = re.findall(r"```yaml\n(# multitune train (\S+)\n.*?)```", readme, re.S)
    assert examples, "the README shows no example config"
    for text, path in examples:
        assert (REPO / path).read_text(encoding="utf-8") == text, f"README.md shows {path}, but not as it is"


_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page: lowercased, punctuation dropped, spaces as hyphens."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = 1
        anchor = slug
        while anchor in found:
            anchor, n = f"{slug}-{n}", n + 1
        found.add(anchor)
    return found


def test_doc_links_and_anchors_resolve():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in _LINK.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
