"""multitune deletes or rewrites only what it created: ``--overwrite`` and ``--resume`` refuse folders that are not
multitune's or that hold the run's inputs; one process writes a run at a time (an OS lock, never stale); resume
refuses data that changed under its checkpoint; a full disk during a checkpoint is one line that names the last
good checkpoint. Every test works in its own temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from multitune.cli import main
from multitune.rundir import MARKER, read_marker
from tests.conftest import REPO, write
from tests.test_crash_resume import checkpoint_step, run_driver

ROWS = "label\tsentence\n" + "".join(f"{'pos' if i % 2 else 'neg'}\tsentence number {i}\n" for i in range(24))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def config(root: Path, backbone: str, out: str | Path, data: Path | None = None, **training) -> Path:
    data = data or write(root / "train.tsv", ROWS)
    raw = {"backbone": backbone, "output_dir": str(out), "seed": 3,
           "tasks": {"sentiment": {"type": "classification", "data": {"train": {"path": str(data),
                                                                                "text": "sentence"}}}},
           "training": {"max_steps": 4, "batch_size": 4, "eval_every": 2, "max_length": 16, **training}}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_never_clears_the_folder_of_the_config_the_data_or_the_current_directory(
        tiny_backbone, tmp_path, monkeypatch, capsys):
    work = tmp_path / "project"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    cfg = config(work, tiny_backbone, ".")
    before = tree(work)
    err = one_line_error(capsys, ["train", str(cfg), "--overwrite", "--no-progress"])
    assert f"output_dir: {work}" in err and "not written by multitune" in err
    # even a folder that looks like multitune's is never cleared when it holds the run's inputs or the cwd
    (work / MARKER).write_text(json.dumps({"created_by": "multitune", "kind": "run"}))
    err = one_line_error(capsys, ["train", str(cfg), "--overwrite", "--no-progress"])
    assert "refusing to clear" in err and "current directory" in err
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["train", str(cfg), "--overwrite", "--no-progress", "--set", f"output_dir={work}"])
    assert "refusing to clear" in err and "an input of this run" in err
    (work / MARKER).unlink()
    assert tree(work) == before


def test_overwrite_refuses_home_and_root(tiny_backbone, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / MARKER).write_text(json.dumps({"created_by": "multitune"}))
    (home / ".bashrc").write_text("keep")
    monkeypatch.setenv("HOME", str(home))
    data = write(tmp_path / "data" / "train.tsv", ROWS)
    cfg = config(tmp_path, tiny_backbone, home, data)
    err = one_line_error(capsys, ["train", str(cfg), "--overwrite", "--no-progress"])
    assert "home directory" in err and (home / ".bashrc").read_text() == "keep"
    err = one_line_error(capsys, ["train", str(cfg), "--overwrite", "--no-progress", "--set", "output_dir=/"])
    assert "output_dir: /" in err


def test_resume_refuses_a_folder_that_is_not_a_run(tiny_backbone, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "my_weights.bin").write_bytes(b"\x00" * 64)
    before = tree(out)
    cfg = config(tmp_path, tiny_backbone, out)
    err = one_line_error(capsys, ["train", str(cfg), "--resume", "--no-progress"])
    assert "not a multitune run directory" in err and "nothing to resume" in err
    assert tree(out) == before


def test_overwrite_replaces_a_run_through_a_symlink_and_keeps_the_link(tiny_backbone, tmp_path, capsys):
    real = tmp_path / "real-run"
    link = tmp_path / "link"
    cfg = config(tmp_path, tiny_backbone, link)
    link.symlink_to(real, target_is_directory=True)
    real.mkdir()
    assert main(["train", str(cfg), "--no-progress"]) == 0
    assert (real / MARKER).is_file() and (real / "model").is_dir()
    (real / "stale.txt").write_text("from the earlier run")
    assert main(["train", str(cfg), "--overwrite", "--no-progress"]) == 0
    assert link.is_symlink() and not (real / "stale.txt").exists() and (real / "model").is_dir()
    # a link to a folder that is not multitune's is judged by its target
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    link.unlink()
    link.symlink_to(other, target_is_directory=True)
    err = one_line_error(capsys, ["train", str(cfg), "--overwrite", "--no-progress"])
    assert "a link to" in err and (other / "keep.txt").read_text() == "keep"


def test_a_run_written_before_markers_is_still_replaced(tiny_backbone, tmp_path):
    out = tmp_path / "old"
    cfg = config(tmp_path, tiny_backbone, out)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    (out / MARKER).unlink()
    assert main(["train", str(cfg), "--overwrite", "--no-progress"]) == 0
    assert read_marker(out)["kind"] == "run"


def test_a_second_process_into_the_same_run_gets_one_line_with_the_holders_pid(tiny_backbone, tmp_path, capsys):
    """Two real ``multitune train`` processes: the second stops before writing anything; once the first is
    killed (SIGKILL: no cleanup runs) its lock is gone and the directory can be replaced."""
    out = tmp_path / "shared"
    long_cfg = config(tmp_path, tiny_backbone, out, max_steps=100000, eval_every=50)
    first = subprocess.Popen([sys.executable, "-m", "multitune.cli", "train", str(long_cfg), "--no-progress"],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while (read_marker(out) or {}).get("pid") != first.pid:
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.05)
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "multitune.cli", "train", str(long_cfg), "--overwrite",
                                 "--no-progress"], env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"PID {first.pid}" in lines[0] and "another multitune process" in lines[0]
        resumed = subprocess.run([sys.executable, "-m", "multitune.cli", "train", str(long_cfg), "--resume",
                                  "--no-progress"], env=ENV, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 2 and f"PID {first.pid}" in resumed.stderr
        assert first.poll() is None  # the first run went on undisturbed
    finally:
        first.kill()
        first.wait()
    short = config(tmp_path, tiny_backbone, out)
    assert main(["train", str(short), "--overwrite", "--no-progress"]) == 0  # no stale lock
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r.get("kind") == "eval"]
    assert steps == sorted(set(steps)) and steps  # one writer: no duplicate evaluation lines


def test_resume_refuses_changed_data_unless_accepted(tiny_backbone, tmp_path, capsys):
    out = tmp_path / "run"
    data = write(tmp_path / "train.tsv", ROWS)
    cfg = config(tmp_path, tiny_backbone, out, data)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    state = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert list(state["data_files"]) == [str(data.resolve())]
    os.utime(data, (1, 1))  # touched, same content: fine
    assert main(["train", str(cfg), "--resume", "--no-progress"]) == 0
    capsys.readouterr()
    data.write_text(ROWS.replace("sentence number 3", "sentence number three"))
    err = one_line_error(capsys, ["train", str(cfg), "--resume", "--no-progress"])
    assert str(data.resolve()) in err and "changed since checkpoint" in err and "--accept-changed-data" in err
    assert main(["train", str(cfg), "--resume", "--accept-changed-data", "--no-progress"]) == 0
    err = one_line_error(capsys, ["train", str(cfg), "--accept-changed-data", "--no-progress", "--overwrite"])
    assert "only applies with --resume" in err


def test_damaged_resume_inputs_are_one_line(tiny_backbone, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = config(tmp_path, tiny_backbone, out)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    with open(out / "metrics.jsonl", "a") as fh:  # a damaged line that still parses is skipped
        fh.write('7\n"x"\n{"step": "two"}\n')
    assert main(["train", str(cfg), "--resume", "--no-progress"]) == 0
    capsys.readouterr()
    state = out / "checkpoints" / "last" / "trainer_state.json"
    good = state.read_text()
    state.write_text(json.dumps({"step": 2}))
    err = one_line_error(capsys, ["train", str(cfg), "--resume", "--no-progress"])
    assert "trainer_state.json" in err and "damaged" in err
    state.write_text(good)
    (out / "config.yaml").write_text("tasks: [unclosed\n")
    err = one_line_error(capsys, ["train", str(cfg), "--resume", "--no-progress"])
    assert "config.yaml" in err and "cannot read the run's saved config" in err


@pytest.mark.skipif(sys.platform != "linux", reason="file-size limits (RLIMIT_FSIZE) as a stand-in for a full disk")
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_good_one(tiny_backbone, tmp_path):
    """The run is killed after its step-2 checkpoint; resumed under a 6 MB file-size limit, its step-4 checkpoint
    cannot write the optimizer state (about 8 MB): one line names the file and the step-2 checkpoint, no
    temporary directory is left, and the step-2 checkpoint still loads."""
    out = tmp_path / "run"
    cfg = config(tmp_path, tiny_backbone, out, max_steps=6)
    raw = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    # the word embeddings train, so that their AdamW state makes the optimizer file larger than the limit
    cfg.write_text(yaml.safe_dump({**raw, "freeze": "none"}), encoding="utf-8")
    assert run_driver("batch", 3, cfg, tmp_path) == "killed"
    assert checkpoint_step(out) == 2
    limit = 6 << 20
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
              "from multitune.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", script, "train", str(cfg), "--resume", "--no-progress"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    # the run had reported its progress; its failure is one line, the last, with no traceback
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith("multitune: error: ") and "optimizer.pt" in last and "file too large" in last.lower()
    assert f"last good checkpoint is {out / 'checkpoints' / 'last'}" in last
    assert not list((out / "checkpoints").glob(".*tmp*"))
    assert checkpoint_step(out) == 2


def test_export_overwrites_only_its_own_exports(tiny_backbone, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(config(tmp_path, tiny_backbone, run)), "--no-progress"]) == 0
    target = tmp_path / "export"
    assert main(["export", str(run), "--task", "sentiment", "--output", str(target)]) == 0
    assert read_marker(target)["kind"] == "export"
    assert main(["export", str(run), "--task", "sentiment", "--output", str(target), "--overwrite"]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    err = one_line_error(capsys, ["export", str(run), "--task", "sentiment", "--output", str(mine), "--overwrite"])
    assert "not written by multitune" in err and (mine / "notes.txt").read_text() == "keep"
    err = one_line_error(capsys, ["export", str(run), "--task", "sentiment", "--output", str(tmp_path),
                                  "--overwrite"])
    assert "--output" in err and run.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folders
