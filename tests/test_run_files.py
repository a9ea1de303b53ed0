"""A run's own files: a damaged checkpoint, student, metrics.jsonl or config.yaml is named as damaged with what to
do (a resume passes over a damaged newest checkpoint for the one before it), and a full disk during distill is one
line that says how to continue, leaving no temporary checkpoint behind (and a resume removes old ones)."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from kdcache.report import metrics_csv
from kdcache.run_files import RunFileError, is_no_space
from kdcache.stages import distill, evaluate, extract
from kdcache.train import engine

N, S = 96, 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run-files") / "cache"
    return extract.run(extract.ExtractConfig(dataset="synthetic", dataset_options=(("n", N),), teacher="test_vit",
                                             random_init=True, views=2, shard_size=S, batch_size=6, workers=0,
                                             out=str(out), progress=False))


def _cfg(cache, out, **kw) -> distill.DistillConfig:
    base = dict(cache=str(cache), student="test_efficientnet", image_size=32, method="kd", scenario="ssl",
                labels_per_class=2, epochs=2, batch_size=16, workers=0, out=str(out), progress=False,
                check_dataset=False)
    return distill.DistillConfig(**(base | kw))


def _args(cache, out, epochs: int) -> list[str]:
    return ["distill", "--cache", str(cache), "--student", "test_efficientnet", "--image-size", "32", "--method", "kd",
            "--scenario", "ssl", "--labels-per-class", "2", "--batch-size", "16", "--workers", "0", "--out", str(out),
            "--no-check-dataset", "--no-progress", "--epochs", str(epochs)]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _epochs(run: Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory) -> Path:
    """A finished 2-epoch run (two checkpoints), copied by each test that damages it."""
    return distill.run(_cfg(cache, tmp_path_factory.mktemp("runs") / "run"))


@pytest.fixture
def run(cache, tmp_path) -> Path:
    """The same run, in a folder of this test's (a run folder is not moved: a resume refuses another --out)."""
    return distill.run(_cfg(cache, tmp_path / "run"))


@pytest.mark.parametrize("name", ["state.pt", "student.safetensors", "method.safetensors"])
def test_a_resume_passes_over_a_damaged_newest_checkpoint_for_the_one_before(cache, trained, run, name, capsys):
    _truncate(run / "checkpoints" / "epoch-0001" / name)
    distill.run(_cfg(cache, run, epochs=3, resume=True))
    warning = capsys.readouterr().err
    assert f"{run / 'checkpoints' / 'epoch-0001' / name} is damaged (" in warning
    assert "resuming from the previous checkpoint, epoch-0000, instead" in warning
    assert _epochs(run) == [0, 1, 2]  # epoch 1 trained again, then epoch 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002", "latest"]
    assert load_file(run / "student.safetensors").keys() == load_file(trained / "student.safetensors").keys()


def test_the_epoch_trained_again_is_the_one_an_uninterrupted_run_trained(cache, trained, run):
    _truncate(run / "checkpoints" / "epoch-0001" / "state.pt")
    distill.run(_cfg(cache, run, resume=True))
    ours, ref = load_file(run / "student.safetensors"), load_file(trained / "student.safetensors")
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    assert _epochs(run) == _epochs(trained)


@pytest.mark.parametrize("name", ["state.pt", "student.safetensors"])
def test_a_resume_with_no_intact_checkpoint_names_the_damaged_file_and_what_to_do(cache, run, name):
    for folder in ("epoch-0000", "epoch-0001"):
        _truncate(run / "checkpoints" / folder / name)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_cli(*_args(cache, run, 3), "--resume", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: {run / 'checkpoints' / 'epoch-0001' / name} is damaged (")
    assert f"no earlier checkpoint is intact: remove {run / 'checkpoints'} to start the run again" in lines[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and not p.name.startswith(".lock")} == \
        {p: b for p, b in before.items() if not p.name.startswith(".lock")}


def test_a_state_that_is_not_a_checkpoint_s_is_named(cache, run):
    torch.save({"epoch": 1}, run / "checkpoints" / "epoch-0001" / "state.pt")
    (run / "checkpoints" / "epoch-0000" / "state.pt").write_bytes(b"not a zip")
    with pytest.raises(RunFileError, match=r"epoch-0001/state.pt is damaged \(it lacks config, optimizer"):
        distill.run(_cfg(cache, run, epochs=3, resume=True))


def test_evaluate_names_a_damaged_student_and_a_resume_writes_it_again(cache, trained, run):
    _truncate(run / "student.safetensors")
    with pytest.raises(RunFileError) as e:
        evaluate.run(evaluate.EvaluateConfig(run=str(run), workers=0, onnx=False, progress=False))
    line = str(e.value)
    assert line.startswith(f"{run / 'student.safetensors'} is damaged (") and "\n" not in line
    assert f"--config {run / 'config.yaml'} --resume --out {run}" in line
    # the command it gives: the run's own config.yaml as --config
    run_cli("distill", "--config", str(run / "config.yaml"), "--resume", "--out", str(run), "--no-progress")
    assert (run / "student.safetensors").read_bytes() == (trained / "student.safetensors").read_bytes()
    assert _epochs(run) == [0, 1]


def test_evaluate_names_a_damaged_config_yaml(run):
    (run / "config.yaml").write_text("cache: [unclosed\n")
    with pytest.raises(RunFileError, match=rf"^{run / 'config.yaml'} is damaged \(line 2, column 1: .*--resume --out"):
        evaluate.load_run(run)
    (run / "config.yaml").unlink()
    with pytest.raises(RunFileError, match=r"config.yaml is damaged \(it is missing\)"):
        evaluate.load_run(run)


def test_a_damaged_metrics_line_is_named(cache, run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0][:20] + "\n" + lines[1] + "\n")
    with pytest.raises(RunFileError, match=r"metrics.jsonl is damaged \(line 1 is not an epoch's record\): remove"):
        metrics_csv(run)
    with pytest.raises(RunFileError, match=r"metrics.jsonl is damaged \(line 1 "):
        distill.run(_cfg(cache, run, epochs=3, resume=True))
    # a last line cut short (a kill during the append) is what a resume drops, as before
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + lines[1][:15])
    distill.run(_cfg(cache, run, epochs=3, resume=True))
    assert _epochs(run) == [0, 1, 2]


@pytest.mark.parametrize("where", ["torch.save", "safetensors", "metrics"])
def test_a_full_disk_is_one_line_and_leaves_no_temporary_checkpoint(cache, tmp_path, monkeypatch, where):
    run = tmp_path / "run"
    calls = {"n": 0}

    def full(*args, **kwargs):
        calls["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "torch.save":
        monkeypatch.setattr(engine.torch, "save", full)
        wrote = run / "checkpoints" / "epoch-0000" / "state.pt"
    elif where == "safetensors":  # safetensors says it in its own error type, not an OSError
        def safetensors_full(*args, **kwargs):
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                               "\"No space left on device\" })")

        monkeypatch.setattr(engine, "save_tensors", safetensors_full)
        wrote = run / "checkpoints" / "epoch-0000" / "student.safetensors"
    else:
        from kdcache.train import run_dir

        monkeypatch.setattr(run_dir, "append_metrics", full)
        wrote = run / "metrics.jsonl"
    proc = run_cli(*_args(cache, run, 2), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1] == (f"error: no space left on device writing {wrote}: free space and run the same command "
                         f"again with --resume --out {run} to continue the run")
    assert not list(run.rglob(".*.tmp"))
    monkeypatch.undo()
    # space freed: the same command with --resume continues (from the start: no checkpoint was written)
    run_cli(*_args(cache, run, 2), "--resume")
    assert _epochs(run) == [0, 1]


def test_a_resume_removes_the_temporary_files_an_interrupted_write_left(cache, run):
    stale = [run / "checkpoints" / ".epoch-0002.4242.tmp", run / ".student.safetensors.4242.tmp",
             run / "checkpoints" / ".latest.4242.tmp", run / ".metrics.csv.4242.tmp"]
    stale[0].mkdir()
    (stale[0] / "state.pt").write_bytes(b"half")
    for p in stale[1:]:
        p.write_bytes(b"half")
    (run / ".keep.tmp").write_text("not distill's")
    distill.run(_cfg(cache, run, epochs=3, resume=True))
    assert not any(p.exists() for p in stale) and (run / ".keep.tmp").exists()
    assert _epochs(run) == [0, 1, 2]


def test_no_space_is_recognised_in_each_library_s_words():
    assert is_no_space(OSError(errno.ENOSPC, "No space left on device"))
    assert is_no_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_no_space(RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing "
                                    "file data/0: file write failed (No space left on device)"))
    assert not is_no_space(OSError(errno.EACCES, "Permission denied"))
    assert not is_no_space(RuntimeError("shape mismatch"))
