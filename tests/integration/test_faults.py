"""Crash safety and numerical faults with real processes: SIGKILL at every named fault point
(metasft.faults: before, while and after writing a checkpoint's weights, optimizer state and trainer
state, around the rename) leaves a loadable checkpoint, and resuming reaches bit-identical final
weights; SIGTERM stops after a meta-step with a checkpoint; persistent non-finite losses stop the
run cleanly. Faults are chosen by place and meta-step, never by timing."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from metasft.checkpoint import latest_checkpoint
from metasft.cli import main
from metasft.faults import POINTS

import procs
from conftest import write_tasks

pytestmark = pytest.mark.slow
STEPS = 10


def train_args(model_dir, tasks, run_dir, extra=()):
    return [f"model.partial_pretrain={model_dir}", "meta.algorithm=fomaml", "meta.meta_batch_size=2",
            "meta.inner_batch_size=3", "meta.query_batch_size=3", "meta.num_inner_steps=2", "meta.inner_lr=0.1",
            "meta.outer_lr=0.003", f"trainer.total_training_steps={STEPS}", "trainer.save_freq=1", "trainer.keep=2",
            "data.chat_template=none", "trainer.logger=[jsonl]", "trainer.device=cpu",
            f"trainer.default_local_dir={run_dir}", *tasks, *extra]


def run_with_fault(args, fault=None, signal_name="SIGKILL", timeout=300):
    """Run `metasft train` in a child process that dies at ``fault`` ("POINT@STEP"); returns
    (exit code, stderr), read only after the child has exited."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "METASFT_FAULT_SIGNAL": signal_name}
    env.pop("METASFT_FAULT", None)
    if fault:
        env["METASFT_FAULT"] = fault
    proc = procs.run([sys.executable, "-m", "metasft", "train", *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env, timeout=timeout)
    return proc.returncode, proc.stderr


def final_weights(run_dir):
    return load_file(run_dir / f"step_{STEPS}" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("faults")
    tasks = write_tasks(root / "tasks", 4, 6, 4)
    # A child process with the same single thread as the killed runs: bit-identity is promised for the
    # same configuration, and task-batched passes are large enough for torch to split them differently
    # over 2 threads than over 1.
    code, err = run_with_fault(train_args(tiny_llama_dir, tasks, root / "straight"))
    assert code == 0, err[-3000:]
    return tasks, final_weights(root / "straight")


def step_of(checkpoint):
    return None if checkpoint is None else int(checkpoint.name.split("_")[1])


# (fault, checkpoint expected on disk afterwards) in the order one run dir lives through them:
# every restart resumes from what the previous kill left. A kill before the rename keeps the
# previous step; after it, the new one.
KILL_CHAIN = [("meta_step.end@1", None), ("checkpoint.before_weights@2", 1), ("checkpoint.while_weights@3", 2),
              ("checkpoint.after_weights@4", 3), ("checkpoint.while_optimizer@5", 4),
              ("checkpoint.after_optimizer@6", 5), ("checkpoint.while_trainer_state@7", 6),
              ("checkpoint.before_rename@8", 7), ("checkpoint.after_rename@8", 8)]


def test_sigkill_at_every_fault_point_then_resume_is_bit_identical(tmp_path, tiny_llama_dir, reference):
    tasks, expected = reference
    run_dir = tmp_path / "run"
    args = train_args(tiny_llama_dir, tasks, run_dir)
    for fault, survivor in KILL_CHAIN:
        code, err = run_with_fault(args, fault)
        assert code == -signal.SIGKILL, (fault, err[-2000:])
        assert step_of(latest_checkpoint(run_dir)) == survivor, fault
        if survivor is not None:
            AutoModelForCausalLM.from_pretrained(latest_checkpoint(run_dir))  # complete and loadable
    # Re-saving a step that exists (resume from an older checkpoint): die with the old copy moved
    # aside and the new one not yet in place. The next start puts the old copy back.
    code, err = run_with_fault(args + [f"trainer.resume_mode={run_dir / 'step_7'}"], "checkpoint.while_replacing@8")
    assert code == -signal.SIGKILL, err[-2000:]
    assert not (run_dir / "step_8").exists() and list(run_dir.glob(".step_8.old-*"))
    covered = {f.split("@")[0] for f, _ in KILL_CHAIN} | {"checkpoint.while_replacing"}
    assert covered == set(POINTS)
    code, err = run_with_fault(args)
    assert code == 0, err[-3000:]
    got = final_weights(run_dir)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".step_")], "temporary checkpoint left behind"


def test_sigterm_saves_and_stops_then_resumes(tmp_path, tiny_llama_dir, reference):
    tasks, _ = reference
    long_run = ["trainer.total_training_steps=100000", "trainer.save_freq=-1"]
    run_dir = tmp_path / "run"
    # SIGTERM arrives (sent by the process to itself) right after meta-step 3's update.
    code, err = run_with_fault(train_args(tiny_llama_dir, tasks, run_dir, long_run), "meta_step.end@3", "SIGTERM")
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM after meta-step 3" in err and "Traceback" not in err
    assert step_of(latest_checkpoint(run_dir)) == 3
    # Resume two more steps; compare with a run that did all of them without stopping.
    # (Child processes throughout: one thread each, as the stopped run had.)
    finish = ["trainer.total_training_steps=5"]
    for run in (run_dir, tmp_path / "straight"):
        code, err = run_with_fault(train_args(tiny_llama_dir, tasks, run, finish))
        assert code == 0, err[-3000:]
    a = load_file(run_dir / "step_5" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "step_5" / "model.safetensors")
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


def test_sigint_saves_and_stops_like_sigterm(tmp_path, tiny_llama_dir, reference):
    tasks, _ = reference
    run_dir = tmp_path / "run"
    code, err = run_with_fault(train_args(tiny_llama_dir, tasks, run_dir, ["trainer.total_training_steps=100000",
                                                                           "trainer.save_freq=-1"]),
                               "meta_step.end@2", "SIGINT")
    assert code == 128 + signal.SIGINT, err
    assert "stopped by SIGINT after meta-step 2" in err and "Traceback" not in err
    assert step_of(latest_checkpoint(run_dir)) == 2


def test_a_second_signal_while_saving_stops_at_once_and_loses_nothing(tmp_path, tiny_llama_dir, reference):
    """SIGINT after meta-step 3, then a second SIGINT in the middle of the checkpoint that the first
    asked for: the run stops there (exit 130), the half-written checkpoint never becomes one, the
    previous one is intact, and resuming from it ends where an uninterrupted run does."""
    tasks, expected = reference
    run_dir = tmp_path / "run"
    args = train_args(tiny_llama_dir, tasks, run_dir, ["trainer.save_freq=2"])
    code, err = run_with_fault(args, "meta_step.end@3,checkpoint.after_weights@3", "SIGINT")
    assert code == 130 and "interrupted" in err, err[-2000:]
    assert step_of(latest_checkpoint(run_dir)) == 2
    assert not (run_dir / "step_3").exists()
    AutoModelForCausalLM.from_pretrained(run_dir / "step_2")
    code, err = run_with_fault(args)
    assert code == 0, err[-3000:]
    got = final_weights(run_dir)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".step_")], "temporary checkpoint left behind"


def test_a_transient_non_finite_step_is_skipped_with_weights_and_optimizer_untouched(tmp_path, tiny_llama_dir,
                                                                                     reference):
    tasks, _ = reference
    run_dir = tmp_path / "run"
    code, err = run_with_fault(train_args(tiny_llama_dir, tasks, run_dir, ["trainer.keep=null", "optim.name=adamw"]),
                               "meta_step.nonfinite@2")
    assert code == 0, err[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in records][:4] == [0, 0, 1, 1]
    assert records[2].get("grad_norm") is None and records[3]["grad_norm"] > 0
    # Meta-step 3 (index 2) was skipped: θ and AdamW's moments and step count are as after meta-step 2.
    a, b = (load_file(run_dir / f"step_{s}" / "model.safetensors") for s in (2, 3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt2, opt3 = (torch.load(run_dir / f"step_{s}" / "optimizer.pt", weights_only=True)["optimizer"] for s in (2, 3))
    for key, state in opt2["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt3["state"][key][name]), (key, name)
    # Then training goes on: meta-step 4 moves θ again.
    c = load_file(run_dir / "step_4" / "model.safetensors")
    assert any(not torch.equal(b[k], c[k]) for k in b)
