"""Distributed training with real `torchrun` processes on CPU (gloo, 2 ranks).

For each strategy (task-parallel, FSDP2) and algorithm, one SGD meta-step on 2 ranks must equal
the single-process update on the same meta-batch (relative error <= 1e-4), with a meta-batch of 3
tasks that 2 ranks cannot split evenly. Killing a rank must end the run instead of hanging it.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from metasft.cli import main

from conftest import write_tasks

pytestmark = pytest.mark.slow

EXACT = ["optim.name=sgd", "meta.outer_lr=1", "optim.clip_grad=null", "optim.weight_decay=0",
         "trainer.total_training_steps=1", "trainer.precision=fp32", "meta.meta_batch_size=3",
         "meta.inner_batch_size=3", "meta.query_batch_size=3", "meta.inner_lr=0.2", "meta.num_inner_steps=2",
         "data.chat_template=none", "optim.lr_scheduler=constant", "trainer.logger=[jsonl]", "trainer.device=cpu"]


def torchrun(args, timeout=240, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
           "-m", "metasft", "train", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "METASFT_DIST_TIMEOUT": "60"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **popen)


def weights(step_dir):
    files = ["adapter_model.safetensors"] if (step_dir / "adapter_model.safetensors").exists() else ["model.safetensors"]
    return load_file(step_dir / files[0])


def assert_same_update(single, multi, initial=None):
    a, b = weights(single), weights(multi)
    assert a.keys() == b.keys()
    if initial is None:
        delta_a, delta_b = a, b
    else:
        delta_a = {k: a[k].double() - initial[k].double() for k in a}
        delta_b = {k: b[k].double() - initial[k].double() for k in a}
    num = sum(((delta_a[k].double() - delta_b[k].double()) ** 2).sum() for k in a) ** 0.5
    den = sum((delta_a[k].double() ** 2).sum() for k in a) ** 0.5
    assert float(den) > 0 and float(num / den) <= 1e-4, float(num / den)


LORA = ["model.lora_rank=4", "model.lora_alpha=8"]
# Every supported (strategy, algorithm, scope); second-order MAML under FSDP is refused (tested in
# tests/unit/test_config.py and tests/integration/test_bad_inputs.py).
CASES = [(strategy, algorithm, extra)
         for strategy, algorithms in (("task-parallel", ("maml", "fomaml", "reptile", "sft")),
                                      ("fsdp", ("fomaml", "reptile", "sft")))
         for algorithm in algorithms for extra in ([], LORA)]


@pytest.mark.parametrize("strategy,algorithm,extra", CASES,
                         ids=[f"{s}-{a}-{'lora' if e else 'full'}" for s, a, e in CASES])
def test_two_ranks_equal_one(tmp_path, tiny_llama_dir, strategy, algorithm, extra):
    tasks = write_tasks(tmp_path / "tasks", 4, 5, 4)
    args = [f"model.partial_pretrain={tiny_llama_dir}", f"meta.algorithm={algorithm}", *EXACT, *tasks, *extra]
    if extra:  # LoRA: perturb-free adapters start at B = 0; give the update something to move
        args.append("meta.outer_lr=0.5")
    assert main(["train", *args, f"trainer.default_local_dir={tmp_path / 'one'}"]) == 0
    proc = torchrun([*args, f"model.use_fsdp={str(strategy == 'fsdp').lower()}",
                     f"trainer.default_local_dir={tmp_path / 'two'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two").glob("step_*")) == ["step_1"]
    initial = None if extra else load_file(tiny_llama_dir / "model.safetensors")
    assert_same_update(tmp_path / "one" / "step_1", tmp_path / "two" / "step_1", initial)


def test_fsdp_checkpoint_loads_and_resumes(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    tasks = write_tasks(tmp_path / "tasks", 4, 6, 4)
    args = [f"model.partial_pretrain={tiny_llama_dir}", "meta.algorithm=fomaml", "model.use_fsdp=true",
            "meta.meta_batch_size=2", "meta.inner_batch_size=3", "meta.query_batch_size=3", "meta.num_inner_steps=2",
            "meta.inner_lr=0.1", "meta.outer_lr=0.003", "trainer.save_freq=1", "data.chat_template=none",
            "trainer.logger=[jsonl]", "trainer.device=cpu", *tasks]
    straight = torchrun([*args, "trainer.total_training_steps=3", f"trainer.default_local_dir={tmp_path / 'a'}"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "step_3")
    first = torchrun([*args, "trainer.total_training_steps=3", f"trainer.default_local_dir={tmp_path / 'b'}"])
    assert first.returncode == 0, first.stderr[-3000:]
    import shutil

    shutil.rmtree(tmp_path / "b" / "step_3")
    resumed = torchrun([*args, "trainer.total_training_steps=3", f"trainer.default_local_dir={tmp_path / 'b'}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(tmp_path / "a" / "step_3"), weights(tmp_path / "b" / "step_3")
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-8) for k in a)


def test_killing_one_rank_ends_the_run(tmp_path, tiny_llama_dir):
    tasks = write_tasks(tmp_path / "tasks", 4, 6, 4)
    args = [f"model.partial_pretrain={tiny_llama_dir}", "meta.algorithm=fomaml", "meta.meta_batch_size=2",
            "meta.inner_batch_size=3", "meta.num_inner_steps=2", "trainer.total_training_steps=100000",
            "data.chat_template=none", "trainer.logger=[jsonl]", "trainer.device=cpu",
            f"trainer.default_local_dir={tmp_path / 'run'}", *tasks]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
           "-m", "metasft", "train", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "METASFT_DIST_TIMEOUT": "60"})
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.5)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)
    try:
        code = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the surviving rank hung after its peer was killed")
    assert code != 0
    assert not any(p.name.startswith(".step") for p in (tmp_path / "run").iterdir())


def test_fsdp_bf16_mixed_precision_trains_and_saves_fp32(tmp_path, tiny_llama_dir):
    tasks = write_tasks(tmp_path / "tasks", 4, 6, 4)
    proc = torchrun([f"model.partial_pretrain={tiny_llama_dir}", "meta.algorithm=fomaml", "model.use_fsdp=true",
                     "trainer.precision=bf16", "meta.meta_batch_size=2", "meta.inner_batch_size=3",
                     "meta.num_inner_steps=2", "trainer.total_training_steps=2", "data.chat_template=none",
                     "meta.inner_lr=0.05", "meta.outer_lr=0.001",
                     "trainer.logger=[jsonl]", "trainer.device=cpu", f"trainer.default_local_dir={tmp_path / 'run'}",
                     *tasks])
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = weights(tmp_path / "run" / "step_2")
    initial = load_file(tiny_llama_dir / "model.safetensors")
    bad = [k for k, v in saved.items() if v.dtype != torch.float32 or not torch.isfinite(v).all()]
    assert not bad, (bad, proc.stdout[-2000:])
    assert any(not torch.equal(saved[k], initial[k]) for k in saved), proc.stdout[-2000:]
