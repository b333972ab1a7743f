"""Crash safety and numerical faults with real processes: SIGKILL at random moments (including
during checkpoint writes) and SIGTERM leave a loadable checkpoint, and resuming reaches the same
final weights as an uninterrupted run; persistent non-finite losses stop the run cleanly."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from metasft.checkpoint import latest_checkpoint
from metasft.cli import main

from conftest import write_tasks

pytestmark = pytest.mark.slow
STEPS = 10


def train_args(model_dir, tasks, run_dir, extra=()):
    return [f"model.partial_pretrain={model_dir}", "meta.algorithm=fomaml", "meta.meta_batch_size=2",
            "meta.inner_batch_size=3", "meta.query_batch_size=3", "meta.num_inner_steps=2", "meta.inner_lr=0.1",
            "meta.outer_lr=0.003", f"trainer.total_training_steps={STEPS}", "trainer.save_freq=1", "trainer.keep=2",
            "data.chat_template=none", "trainer.logger=[jsonl]", "trainer.device=cpu",
            f"trainer.default_local_dir={run_dir}", *tasks, *extra]


def spawn(args):
    return subprocess.Popen([sys.executable, "-m", "metasft", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def final_weights(run_dir):
    return load_file(run_dir / f"step_{STEPS}" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("faults")
    tasks = write_tasks(root / "tasks", 4, 6, 4)
    assert main(["train", *train_args(tiny_llama_dir, tasks, root / "straight")]) == 0
    return tasks, final_weights(root / "straight")


def test_kill_9_at_random_moments_then_resume_matches_uninterrupted(tmp_path, tiny_llama_dir, reference):
    tasks, expected = reference
    run_dir = tmp_path / "run"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(6):
        proc = spawn(train_args(tiny_llama_dir, tasks, run_dir))
        # Let it get past start-up (imports, model load) into training and checkpointing, then kill.
        deadline = time.monotonic() + 60
        while not list(run_dir.glob("step_*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        checkpoint = latest_checkpoint(run_dir)
        assert checkpoint is not None
        AutoModelForCausalLM.from_pretrained(checkpoint)  # the survivor is complete and loadable
    assert kills >= 1
    proc = spawn(train_args(tiny_llama_dir, tasks, run_dir))
    assert proc.wait(timeout=240) == 0, proc.stderr.read()
    got = final_weights(run_dir)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".step_")], "temporary checkpoint left behind"


def test_sigterm_saves_and_stops_then_resumes(tmp_path, tiny_llama_dir, reference):
    tasks, _ = reference
    long_run = ["trainer.total_training_steps=100000", "trainer.save_freq=-1"]
    run_dir = tmp_path / "run"
    proc = spawn(train_args(tiny_llama_dir, tasks, run_dir, long_run))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    stopped_at = int(latest_checkpoint(run_dir).name.split("_")[1])
    assert stopped_at >= 3
    # Resume two more steps; compare with a run that did all of them without stopping.
    finish = [f"trainer.total_training_steps={stopped_at + 2}"]
    assert main(["train", *train_args(tiny_llama_dir, tasks, run_dir, finish)]) == 0
    assert main(["train", *train_args(tiny_llama_dir, tasks, tmp_path / "straight", finish)]) == 0
    a = load_file(run_dir / f"step_{stopped_at + 2}" / "model.safetensors")
    b = load_file(tmp_path / "straight" / f"step_{stopped_at + 2}" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_persistent_non_finite_losses_stop_with_an_intact_checkpoint(tmp_path, tiny_llama_dir, reference, capsys):
    tasks, _ = reference
    run_dir = tmp_path / "run"
    assert main(["train", *train_args(tiny_llama_dir, tasks, run_dir, ["trainer.total_training_steps=2"])]) == 0
    before = load_file(run_dir / "step_2" / "model.safetensors")
    capsys.readouterr()
    code = main(["train", *train_args(tiny_llama_dir, tasks, run_dir, [
        "trainer.total_training_steps=8", "meta.inner_lr=1e38", "trainer.max_nonfinite_steps=2", "trainer.save_freq=1"])])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite loss or gradient for 2 consecutive meta-steps" in err[0]
    checkpoint = latest_checkpoint(run_dir)
    after = load_file(checkpoint / "model.safetensors")
    # Skipped steps never touch θ: whatever was saved still holds the last finite weights.
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
