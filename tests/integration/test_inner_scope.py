"""``meta.inner_scope`` (ANIL, top layers) and ``model.train_top_layers`` through `metasft train`:
one SGD(lr = 1) meta-step moves every meta-parameter by exactly minus an independent float64
reference meta-gradient.

The references are written here, apart from the engine: the inner loop is an explicit SGD loop over
a subset of parameters chosen by *name* (``lm_head`` / ``layers.1.`` / ``model.norm``), with the graph
kept through it for MAML (autograd through an unrolled loop), on ``.grad`` of a deep copy for FOMAML
and Reptile; the outer gradient is taken over every meta-parameter. The tiny Llama has 2 layers and
untied embeddings.
"""

import copy

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from metasft.config import load_config
from metasft.distributed import DistEnv
from metasft.train import Trainer

from conftest import write_tasks
from references import ref_loss
from test_train_cli import EXACT, INNER_LR, K, N_QUERY, N_SUPPORT, N_TASKS, moved_by_minus, run_train, whole_set_batches

LORA = ["model.lora_rank=4", "model.lora_alpha=8", "model.target_modules=[q_proj, v_proj, down_proj, lm_head]"]


def in_scope(name: str, scope: str) -> bool:
    """The reference's own reading of a scope, from parameter names alone."""
    if scope == "all":
        return True
    if scope == "head":
        return "lm_head" in name
    assert scope == "top_layers:1"
    return "lm_head" in name or "layers.1." in name or "model.norm" in name


def reference(model, algorithm, tasks_root, tokenizer, scope):
    """Float64 meta-gradient of every meta-parameter (``requires_grad``) of ``model``, the inner loop
    adapting only the parameters ``in_scope``; whole sets as batches."""
    model = copy.deepcopy(model).double()
    theta = {n: p for n, p in model.named_parameters() if p.requires_grad}
    inner = [n for n in theta if in_scope(n, scope)]
    assert inner and (scope == "all" or len(inner) < len(theta))
    total = {n: torch.zeros_like(p) for n, p in theta.items()}
    for t in range(N_TASKS):
        support, query = whole_set_batches(tasks_root / f"task{t}", tokenizer)
        if algorithm == "maml":
            def call(weights, batch):
                return ref_loss(lambda **kw: functional_call(model, weights, args=(), kwargs=kw), batch)

            with sdpa_kernel(SDPBackend.MATH):
                fast = dict(theta)
                for _ in range(K):
                    grads = torch.autograd.grad(call(fast, support), [fast[n] for n in inner], create_graph=True)
                    fast = {**fast, **{n: fast[n] - INNER_LR * g for n, g in zip(inner, grads)}}
                grads = torch.autograd.grad(call(fast, query), list(theta.values()))
            contribution = dict(zip(theta, grads))
        else:
            adapted = copy.deepcopy(model)
            params = dict(adapted.named_parameters())
            for _ in range(K):
                adapted.zero_grad(set_to_none=True)
                ref_loss(adapted, support).backward()
                with torch.no_grad():
                    for n in inner:
                        params[n] -= INNER_LR * params[n].grad
            if algorithm == "fomaml":
                adapted.zero_grad(set_to_none=True)
                ref_loss(adapted, query).backward()
                contribution = {n: params[n].grad for n in theta}
            else:  # reptile: θ − φ, zero outside the inner scope
                contribution = {n: theta[n].detach() - params[n].detach() for n in theta}
        for n in total:
            total[n] += contribution[n] / N_TASKS
    return total


def initial_model(model_dir, algorithm, args, tmp_path):
    """The run's starting point, meta-parameters marked: a trainer built from the same config (LoRA's
    lora_A is drawn from the seeded RNG)."""
    cfg = load_config(overrides=[f"model.partial_pretrain={model_dir}", f"meta.algorithm={algorithm}",
                                 f"trainer.default_local_dir={tmp_path / 'init'}", *args])
    return Trainer(cfg, DistEnv()).model


def after_step(run_dir, lora):
    if lora:
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(run_dir / "step_1")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "step_1")


CASES = [(a, s) for a in ("maml", "fomaml") for s in ("head", "top_layers:1")] + [("reptile", "top_layers:1")]


@pytest.mark.parametrize("batching", ["false", "true"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("algorithm,scope", CASES)
def test_one_sgd_step_with_an_inner_scope_is_minus_the_reference(tmp_path, tiny_llama_dir, tokenizer, algorithm,
                                                                 scope, lora, batching):
    overrides = write_tasks(tmp_path / "tasks", N_TASKS, N_SUPPORT, N_QUERY)
    args = EXACT + overrides + [f"meta.task_batching={batching}", f"meta.inner_scope={scope}"] + (LORA if lora else [])
    run_train(tiny_llama_dir, tmp_path / "run", args, algorithm)
    initial = initial_model(tiny_llama_dir, algorithm, args, tmp_path)
    grads = reference(initial, algorithm, tmp_path / "tasks", tokenizer, scope)
    after = after_step(tmp_path / "run", lora)
    assert moved_by_minus(initial, after, grads) <= 1e-4
    # The body really is a meta-parameter: it moved (except under Reptile, whose inner loop left it).
    body = [n for n in grads if not in_scope(n, scope)]
    assert body and (algorithm == "reptile") == all(float(grads[n].abs().max()) == 0 for n in body)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("algorithm,scope", [("maml", "head"), ("fomaml", "all"), ("reptile", "all")])
def test_train_top_layers_with_the_prefix_cache_equals_the_reference_and_the_uncached_run(
        tmp_path, tiny_llama_dir, tokenizer, algorithm, scope, lora):
    overrides = write_tasks(tmp_path / "tasks", N_TASKS, N_SUPPORT, N_QUERY)
    args = EXACT + overrides + ["model.train_top_layers=1", f"meta.inner_scope={scope}"] + (LORA if lora else [])
    run_train(tiny_llama_dir, tmp_path / "cached", args, algorithm)
    run_train(tiny_llama_dir, tmp_path / "uncached", args + ["trainer.prefix_cache=false"], algorithm)
    initial = initial_model(tiny_llama_dir, algorithm, args, tmp_path)
    meta = {n for n, p in initial.named_parameters() if p.requires_grad}
    assert meta and all(in_scope(n, "top_layers:1") for n in meta)  # nothing below the top layer trains
    grads = reference(initial, algorithm, tmp_path / "tasks", tokenizer, scope)
    cached, uncached = after_step(tmp_path / "cached", lora), after_step(tmp_path / "uncached", lora)
    assert moved_by_minus(initial, cached, grads) <= 1e-4
    start = dict(initial.named_parameters())
    a, b = dict(cached.named_parameters()), dict(uncached.named_parameters())
    delta_a = {n: a[n].detach().double() - start[n].detach().double() for n in meta}
    delta_b = {n: b[n].detach().double() - start[n].detach().double() for n in meta}
    num = sum(((delta_a[n] - delta_b[n]) ** 2).sum() for n in meta) ** 0.5
    den = sum((delta_b[n] ** 2).sum() for n in meta) ** 0.5
    assert float(num / den) <= 1e-6
    # Frozen weights stayed where they were.
    for n, p in start.items():
        if n not in meta:
            assert torch.equal(p.detach(), a[n].detach()), n


def test_adapt_on_an_anil_checkpoint_changes_only_the_head(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    from metasft.cli import main

    overrides = write_tasks(tmp_path / "tasks", N_TASKS, N_SUPPORT, N_QUERY)
    run_train(tiny_llama_dir, tmp_path / "run", EXACT + overrides + ["meta.inner_scope=head"], "maml")
    checkpoint = tmp_path / "run" / "step_1"
    assert main(["adapt", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "tasks/task0/support.parquet"),
                 "--n-shots", "3", "--output", str(tmp_path / "adapted")]) == 0
    before, after = load_file(checkpoint / "model.safetensors"), load_file(tmp_path / "adapted/model.safetensors")
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"lm_head.weight"}
    import json
    assert json.loads((tmp_path / "adapted/adapt_info.json").read_text())["inner_scope"] == "head"
    # Asked for every weight, the same adaptation moves the body too.
    assert main(["adapt", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "tasks/task0/support.parquet"),
                 "--n-shots", "3", "--inner-scope", "all", "--output", str(tmp_path / "all")]) == 0
    everything = load_file(tmp_path / "all/model.safetensors")
    assert len({n for n in before if not torch.equal(before[n], everything[n])}) > 1


def test_tied_head_scopes_are_refused_in_one_line(tmp_path, tiny_llama_tied_dir, capsys):
    from metasft.cli import main

    overrides = write_tasks(tmp_path / "tasks", N_TASKS, N_SUPPORT, N_QUERY)
    for extra, key in ((["meta.inner_scope=head"], "meta.inner_scope=head"),
                       (["model.train_top_layers=1"], "model.train_top_layers=1")):
        code = main(["train", f"model.partial_pretrain={tiny_llama_tied_dir}", "meta.algorithm=fomaml",
                     f"trainer.default_local_dir={tmp_path / 'run'}", *EXACT, *overrides, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and key in err[0] and "tie" in err[0], err


def test_learned_rates_cover_exactly_the_inner_scope(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    overrides = write_tasks(tmp_path / "tasks", N_TASKS, N_SUPPORT, N_QUERY)
    run_train(tiny_llama_dir, tmp_path / "run", EXACT + overrides + [
        "meta.inner_scope=top_layers:1", "meta.learn_inner_lr=per_tensor", "meta.inner_lr_lr=0.1"], "fomaml")
    rates = load_file(tmp_path / "run" / "step_1" / "inner_lrs.safetensors")
    assert rates and all(in_scope(n, "top_layers:1") for n in rates)
    model = load_file(tmp_path / "run" / "step_1" / "model.safetensors")
    assert set(rates) == {n for n in model if in_scope(n, "top_layers:1")}
    assert any(float(v) != INNER_LR for v in rates.values())  # they were learnt


def test_the_prefix_cache_on_disk_equals_memory_and_is_shared_by_fingerprint(tmp_path, tiny_llama_dir, tokenizer):
    from safetensors.torch import load_file

    overrides = write_tasks(tmp_path / "tasks", N_TASKS, N_SUPPORT, N_QUERY)
    args = EXACT + overrides + ["model.train_top_layers=1", "trainer.total_training_steps=2"]
    run_train(tiny_llama_dir, tmp_path / "memory", args, "fomaml")
    shared = tmp_path / "shared"
    run_train(tiny_llama_dir, tmp_path / "disk", args + [f"trainer.prefix_cache_dir={shared}"], "fomaml")
    (folder,) = list(shared.iterdir())  # one frozen model, one fingerprint
    files = sorted(folder.glob("*.pt"))
    assert len(files) == N_TASKS * (N_SUPPORT + N_QUERY)  # every row of every task, once
    a, b = (load_file(tmp_path / r / "step_2" / "model.safetensors") for r in ("memory", "disk"))
    assert all(torch.equal(a[n], b[n]) for n in a)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    # A second run of the same model reads the rows back and writes none.
    run_train(tiny_llama_dir, tmp_path / "again", args + [f"trainer.prefix_cache_dir={shared}"], "fomaml")
    assert {f: f.stat().st_mtime_ns for f in sorted(folder.glob("*.pt"))} == stamps
    c = load_file(tmp_path / "again" / "step_2" / "model.safetensors")
    assert all(torch.equal(a[n], c[n]) for n in a)
    # Another frozen model (other weights below the cut) gets a folder of its own.
    from metasft.tiny import save_tiny_model

    other = save_tiny_model(tmp_path / "other_model", arch="llama", seed=1)
    run_train(other, tmp_path / "other", args + [f"trainer.prefix_cache_dir={shared}"], "fomaml")
    assert len(list(shared.iterdir())) == 2


def test_lora_runs_with_other_seeds_or_ranks_share_the_cache_but_a_trained_lower_adapter_does_not(tmp_path, tiny_llama_dir):
    """The frozen layers' LoRA adapters start at B = 0 with a seeded random A: a no-op, so runs with
    another seed or rank compute the same states and must find them; an adapter with B != 0 below the cut
    changes the states and must get a folder of its own."""
    import peft
    from transformers import AutoModelForCausalLM

    from metasft.scope import LayerWindow, PrefixCache

    overrides = write_tasks(tmp_path / "tasks", N_TASKS, N_SUPPORT, N_QUERY)
    shared = tmp_path / "shared"
    args = EXACT + overrides + LORA + ["model.train_top_layers=1", "trainer.total_training_steps=1",
                                       f"trainer.prefix_cache_dir={shared}"]
    run_train(tiny_llama_dir, tmp_path / "seed0", args + ["trainer.seed=0"], "fomaml")
    (folder,) = list(shared.iterdir())
    stamps = {f: f.stat().st_mtime_ns for f in folder.glob("*.pt")}
    run_train(tiny_llama_dir, tmp_path / "seed1", args + ["trainer.seed=1"], "fomaml")
    assert list(shared.iterdir()) == [folder]  # the other seed's random A did not split the cache
    assert {f: f.stat().st_mtime_ns for f in folder.glob("*.pt")} == stamps  # and it wrote nothing

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                peft.LoraConfig(r=4, target_modules=["q_proj"]))
    window = LayerWindow(model)
    before = PrefixCache(window, cut=1).fingerprint()
    torch.manual_seed(0)
    for module in model.modules():
        if hasattr(module, "lora_A"):
            torch.nn.init.normal_(module.lora_A["default"].weight)  # another random A: still a no-op
    assert PrefixCache(window, cut=1).fingerprint() == before
    other_rank = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                     peft.LoraConfig(r=16, target_modules=["q_proj"]))
    assert PrefixCache(LayerWindow(other_rank), cut=1).fingerprint() == before  # a no-op at any rank
    with torch.no_grad():
        window.parts.layers[0].self_attn.q_proj.lora_B["default"].weight.fill_(0.01)
    assert PrefixCache(window, cut=1).fingerprint() != before


def test_rows_that_would_not_fit_in_memory_are_cached_on_disk_beside_the_run(tmp_path, tiny_llama_dir, monkeypatch,
                                                                            capsys):
    import metasft.train as train_module

    overrides = write_tasks(tmp_path / "tasks", N_TASKS, N_SUPPORT, N_QUERY)
    monkeypatch.setattr(train_module, "_available_memory", lambda: 1024)  # 1 KiB "available"
    run_train(tiny_llama_dir, tmp_path / "run", EXACT + overrides + ["model.train_top_layers=1"], "fomaml")
    assert "caching it on disk in" in capsys.readouterr().out
    assert len(list((tmp_path / "run" / "prefix_cache").glob("*/*.pt"))) == N_TASKS * (N_SUPPORT + N_QUERY)
