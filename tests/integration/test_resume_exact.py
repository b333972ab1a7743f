"""Resuming an interrupted run continues the same trajectory bit for bit (SPEC §5), for every
algorithm, over full weights and LoRA, with the state that makes this non-trivial: AdamW moments,
a warmup + cosine schedule, batch schedules that are mid-shuffle when the run stops.

Each case runs 4 meta-steps straight, then runs the same command again in a fresh directory,
stops it with SIGTERM after meta-step 2 (the documented interruption path: the loop finishes the
meta-step, keeps its checkpoint and exits 128+15), and reruns the command unchanged
(``trainer.resume_mode=auto``). The step-4 weights, the step-4 optimizer state and the logged
losses of steps 3 and 4 must be identical (``torch.equal``, ``==``), not merely close.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from metasft.cli import main

import procs
from conftest import write_tasks

LORA = ["model.lora_rank=4", "model.lora_alpha=8"]
COMMON = ["meta.meta_batch_size=2", "meta.inner_batch_size=3", "meta.query_batch_size=3", "meta.num_inner_steps=2",
          "meta.inner_lr=0.1", "trainer.total_training_steps=4", "trainer.save_freq=2", "optim.name=adamw",
          "meta.outer_lr=0.003", "optim.lr_scheduler=cosine", "optim.warmup_steps_ratio=0.25",
          "optim.weight_decay=0.01", "data.chat_template=none", "trainer.logger=[jsonl]", "trainer.device=cpu"]

CASES = [(algorithm, lora, []) for algorithm in ("fomaml", "maml", "reptile", "sft") for lora in (False, True)]
CASES += [("reptile", lora, ["meta.inner_optimizer=adam"]) for lora in (False, True)]
CASES += [("metaicl", False, ["meta.metaicl_demos=2"])]
CASES += [("maml", False, ["meta.learn_inner_lr=per_tensor", "meta.inner_lr_lr=0.01"]),
          ("fomaml", True, ["meta.learn_inner_lr=per_tensor_per_step", "meta.inner_lr_lr=0.01"])]
IDS = [f"{a}-{'lora' if lora else 'full'}{('-' + extra[0].split('.')[-1].split('=')[-1]) if extra else ''}"
       for a, lora, extra in CASES]


def train(model_dir, run_dir, args, stop_after=None, monkeypatch=None):
    """``metasft train``; with ``stop_after``, in a child process whose ``meta_step.end`` fault point
    sends it SIGTERM once the loop has finished that meta-step (the handler the loop installs turns
    it into a clean stop). The child runs this process's thread count, so its arithmetic is this
    process's; SIGTERM never reaches pytest itself."""
    argv = ["train", f"model.partial_pretrain={model_dir}", f"trainer.default_local_dir={run_dir}", *args]
    if stop_after is None:
        return main(argv)
    env = {**os.environ, "METASFT_FAULT": f"meta_step.end@{stop_after}", "METASFT_FAULT_SIGNAL": "SIGTERM",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = procs.run([sys.executable, "-m", "metasft", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                     text=True, env=env, timeout=600)
    return proc.returncode


def losses(run_dir):
    keys = ("query_loss_post", "loss", "grad_norm")
    return {r["step"]: tuple(r.get(k) for k in keys)
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,lora,extra", CASES, ids=IDS)
def test_resume_is_bit_exact(tmp_path, tiny_llama_dir, monkeypatch, algorithm, lora, extra):
    weights_file = "adapter_model.safetensors" if lora else "model.safetensors"
    args = [f"meta.algorithm={algorithm}", *COMMON, *(LORA if lora else []), *extra,
            *write_tasks(tmp_path / "tasks", 4, 8, 4)]
    assert train(tiny_llama_dir, tmp_path / "straight", args) == 0

    broken = tmp_path / "broken"
    assert train(tiny_llama_dir, broken, args, stop_after=2, monkeypatch=monkeypatch) == 128 + signal.SIGTERM
    assert sorted(p.name for p in broken.glob("step_*")) == ["step_2"]
    assert train(tiny_llama_dir, broken, args) == 0

    a = load_file(tmp_path / "straight" / "step_4" / weights_file)
    b = load_file(broken / "step_4" / weights_file)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)}/{len(a)} tensors differ, e.g. {differ[0]}: max |Δ| = " \
                       f"{float((a[differ[0]] - b[differ[0]]).abs().max()):.3g}"
    # Steps 3–4 moved the weights (so the comparison is not of two untouched copies) ...
    mid = load_file(broken / "step_2" / weights_file)
    assert any(not torch.equal(a[k], mid[k]) for k in a)
    if lora:  # ... and with LoRA, B left its zero init, so A's gradient was non-zero too
        assert any("lora_B" in k and bool(a[k].abs().sum() > 0) for k in a)

    # Learned inner rates moved and resumed exactly too.
    if any("learn_inner_lr" in e for e in extra):
        rates_a = load_file(tmp_path / "straight" / "step_4" / "inner_lrs.safetensors")
        rates_b = load_file(broken / "step_4" / "inner_lrs.safetensors")
        assert rates_a.keys() == rates_b.keys() and all(torch.equal(rates_a[k], rates_b[k]) for k in rates_a)
        assert any(not torch.equal(v, torch.full_like(v, 0.1)) for v in rates_a.values())

    # The outer optimizer's state (AdamW moments and step counts) is identical as well.
    opt_a = torch.load(tmp_path / "straight" / "step_4" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    opt_b = torch.load(broken / "step_4" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and opt_a
    for i in opt_a:
        for name, value in opt_a[i].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b[i][name])), (i, name)

    # Same logged losses after the resume; the log of the interrupted run has each step once.
    straight, resumed = losses(tmp_path / "straight"), losses(broken)
    assert list(resumed) == [1, 2, 3, 4]
    assert resumed == straight
