"""Distributed training with real `torchrun` processes on CPU (gloo, 2 ranks).

For each strategy (task-parallel, FSDP2) and algorithm, SGD meta-steps on 2 ranks must give the
single-process update on the same meta-batches (relative error of the update <= 1e-4), with a
meta-batch of 3 tasks that 2 ranks cannot split evenly. An FSDP run resumes bit-exactly. (How
launches end — clean exits, a dying rank, two nodes — is tests/distributed/test_launch.py.)
"""

import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from metasft.cli import main

import procs
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
    return procs.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **popen)


def weights(step_dir):
    files = ["adapter_model.safetensors"] if (step_dir / "adapter_model.safetensors").exists() else ["model.safetensors"]
    return load_file(step_dir / files[0])


def relative_error(single: dict, multi: dict, initial: dict, keys) -> tuple[float, float]:
    """(‖Δ_multi − Δ_single‖ / ‖Δ_single‖, ‖Δ_single‖) over ``keys``, with Δ = final − initial in float64."""
    delta_a = {k: single[k].double() - initial[k].double() for k in keys}
    delta_b = {k: multi[k].double() - initial[k].double() for k in keys}
    num = sum(((delta_a[k] - delta_b[k]) ** 2).sum() for k in keys) ** 0.5
    den = sum((delta_a[k] ** 2).sum() for k in keys) ** 0.5
    return float(num / den) if den > 0 else float("inf"), float(den)


def initial_lora_adapter(args: list[str], run_dir) -> dict[str, torch.Tensor]:
    """The adapter a LoRA run starts from, built by the trainer's own constructor (it seeds torch
    with ``trainer.seed`` before peft draws lora_A; lora_B starts at 0), keyed as saved."""
    from peft import get_peft_model_state_dict

    from metasft.config import load_config
    from metasft.distributed import DistEnv
    from metasft.train import Trainer

    cfg = load_config(overrides=[*args, "trainer.resume_mode=disable", f"trainer.default_local_dir={run_dir}"])
    trainer = Trainer(cfg, DistEnv())
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}


LORA = ["model.lora_rank=4", "model.lora_alpha=8"]
# Every supported (strategy, algorithm, scope); second-order MAML under FSDP is refused (tested in
# tests/unit/test_config.py and tests/integration/test_bad_inputs.py).
CASES = [(strategy, algorithm, extra)
         for strategy, algorithms in (("task-parallel", ("maml", "fomaml", "reptile", "sft")),
                                      ("fsdp", ("fomaml", "reptile", "sft")))
         for algorithm in algorithms for extra in ([], LORA)]
CASES += [("task-parallel", "metaicl", ["meta.metaicl_demos=2"]),
          ("task-parallel", "maml", ["meta.learn_inner_lr=per_tensor", "meta.inner_lr_lr=0.5"]),
          ("task-parallel", "fomaml", ["meta.learn_inner_lr=per_tensor_per_step", "meta.inner_lr_lr=0.5"]),
          # Inner scopes and the prefix cache (issue 23): ANIL with learned rates on the head, and the
          # top layer alone with its frozen prefix cached per row on each rank.
          ("task-parallel", "maml", ["meta.inner_scope=head", "meta.learn_inner_lr=per_tensor", "meta.inner_lr_lr=0.5"]),
          ("task-parallel", "fomaml", ["model.train_top_layers=1", "meta.inner_scope=top_layers:1"])]


@pytest.mark.parametrize("strategy,algorithm,extra", CASES,
                         ids=[f"{s}-{a}-{'lora' if e == LORA else 'full'}{'-' + e[0].split('=')[-1] if e and e != LORA else ''}"
                              + ("-scoped" if any("scope" in x or "top_layers" in x for x in e) else "")
                              for s, a, e in CASES])
def test_two_ranks_equal_one(tmp_path, tiny_llama_dir, strategy, algorithm, extra):
    """The *update* (final − initial weights) on 2 ranks equals the 1-rank update, relative error
    ≤ 1e-4. Comparing updates, not weights: ‖θ‖ ≫ ‖Δθ‖ would hide a wrong update in the weights'
    rounding. LoRA runs 2 SGD meta-steps: peft starts lora_B at 0, so in the first meta-step lora_A
    moves only through the inner loop's own B (and not at all for sft); the second meta-step moves
    both, and A and B are checked separately so B's larger update cannot mask an error in A's."""
    tasks = write_tasks(tmp_path / "tasks", 4, 5, 4)
    args = [f"model.partial_pretrain={tiny_llama_dir}", f"meta.algorithm={algorithm}", *EXACT, *tasks, *extra]
    steps = 1
    if extra == LORA:
        steps = 2
        args += ["meta.outer_lr=0.5", f"trainer.total_training_steps={steps}"]
    # One rank runs the sequential engine; two task-parallel ranks batch their tasks (the default,
    # auto), so this also checks batched = sequential across processes. FSDP falls back to sequential.
    assert main(["train", *args, "meta.task_batching=false", f"trainer.default_local_dir={tmp_path / 'one'}"]) == 0
    proc = torchrun([*args, f"model.use_fsdp={str(strategy == 'fsdp').lower()}",
                     f"trainer.default_local_dir={tmp_path / 'two'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two").glob("step_*")) == [f"step_{steps}"]
    single, multi = weights(tmp_path / "one" / f"step_{steps}"), weights(tmp_path / "two" / f"step_{steps}")
    assert single.keys() == multi.keys()
    if extra != LORA:
        initial = load_file(tiny_llama_dir / "model.safetensors")
        groups = {"all": list(single)}
        if "model.train_top_layers=1" in extra:  # frozen below the top layer: only the top moved
            moved = {k for k in single if not torch.equal(single[k], initial[k])}
            assert moved and all(k.startswith(("model.layers.1.", "model.norm", "lm_head")) for k in moved), moved
            groups = {"top": sorted(moved)}
    else:
        initial = initial_lora_adapter(args, tmp_path / "init")
        assert initial.keys() == single.keys()
        assert all(not v.any() for k, v in initial.items() if "lora_B" in k)
        groups = {part: [k for k in single if part in k] for part in ("lora_A", "lora_B")}
    if any("learn_inner_lr" in e for e in extra):  # the learned rates took the same step too
        groups = {"rates": None, **groups}
        single_rates = load_file(tmp_path / "one" / f"step_{steps}" / "inner_lrs.safetensors")
        multi_rates = load_file(tmp_path / "two" / f"step_{steps}" / "inner_lrs.safetensors")
        initial_rates = {k: torch.full_like(v, 0.2) for k, v in single_rates.items()}
        error, norm = relative_error(single_rates, multi_rates, initial_rates, list(single_rates))
        assert norm > 0 and error <= 1e-4, ("rates", error, norm)
        groups.pop("rates")
    for group, keys in groups.items():
        error, norm = relative_error(single, multi, initial, keys)
        _, norm_multi = relative_error(multi, single, initial, keys)
        assert norm > 0 and norm_multi > 0, f"{group} did not move"
        assert error <= 1e-4, (group, error, norm)


def test_fsdp_checkpoint_loads_and_resumes(tmp_path, tiny_llama_dir):
    """An FSDP run resumed from its step-2 checkpoint ends bit-identical to the uninterrupted run
    (weights and AdamW state, ``torch.equal``): saving gathers exact fp32 copies of the shards,
    loading scatters them back unchanged, and at the same world size every collective and kernel
    repeats the same operations in the same order. (On a different number of ranks the gradient
    sums would be formed in another order: not expected to be bit-exact; docs/distributed.md.)"""
    from transformers import AutoModelForCausalLM

    tasks = write_tasks(tmp_path / "tasks", 4, 6, 4)
    args = [f"model.partial_pretrain={tiny_llama_dir}", "meta.algorithm=fomaml", "model.use_fsdp=true",
            "meta.meta_batch_size=2", "meta.inner_batch_size=3", "meta.query_batch_size=3", "meta.num_inner_steps=2",
            "meta.inner_lr=0.1", "meta.outer_lr=0.003", "optim.lr_scheduler=cosine", "optim.warmup_steps_ratio=0.34",
            "trainer.save_freq=1", "data.chat_template=none", "trainer.logger=[jsonl]", "trainer.device=cpu", *tasks]
    straight = torchrun([*args, "trainer.total_training_steps=3", f"trainer.default_local_dir={tmp_path / 'a'}"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "step_3")
    first = torchrun([*args, "trainer.total_training_steps=3", f"trainer.default_local_dir={tmp_path / 'b'}"])
    assert first.returncode == 0, first.stderr[-3000:]
    import shutil

    shutil.rmtree(tmp_path / "b" / "step_3")
    resumed = torchrun([*args, "trainer.total_training_steps=3", f"trainer.default_local_dir={tmp_path / 'b'}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_2" in resumed.stdout
    a, b = weights(tmp_path / "a" / "step_3"), weights(tmp_path / "b" / "step_3")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, (differ, [float((a[k] - b[k]).abs().max()) for k in differ])
    mid = weights(tmp_path / "b" / "step_2")
    assert any(not torch.equal(a[k], mid[k]) for k in a)  # step 3 moved the weights
    opt_a, opt_b = (torch.load(tmp_path / run / "step_3" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
                    for run in ("a", "b"))
    assert opt_a.keys() == opt_b.keys() and opt_a
    assert all(torch.equal(torch.as_tensor(opt_a[p][n]), torch.as_tensor(opt_b[p][n])) for p in opt_a for n in opt_a[p])


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
