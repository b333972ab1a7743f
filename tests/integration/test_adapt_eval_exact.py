"""`metasft adapt` and `metasft eval` against values computed here (SPEC §7).

adapt: K plain-SGD steps at lr on the chosen shots equal ``references.ref_adapt`` on batches built
by hand (``ref_data.ref_batch``); with ``--n-shots`` = the whole file and a batch size at least that
large every step uses the whole set, so the draw cannot matter, and with fewer shots exactly one
subset of the rows reproduces the update. eval: the query loss is ``ref_loss``, token accuracy an
argmax count over response targets, exact match and ROUGE-L come from a plain greedy loop over
model forwards and an LCS written here. Then LoRA end to end: train → adapt → eval.
"""

import itertools
import json
import math

import pytest
import torch
from peft import AutoPeftModelForCausalLM, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from metasft.cli import main

from conftest import cipher_rows
from ref_data import num_targets, prompt_ids, ref_batch, rel_err, write_rows, write_uneven_tasks
from references import ref_adapt, ref_loss


def load64(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).double()
    model.train()
    return model


def deltas(before: dict, after: dict) -> dict:
    return {n: after[n].double() - before[n].double() for n in before}


def params_of(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- adapt

def test_adapt_base_model_equals_sgd_on_the_whole_shot_set(tmp_path, tiny_llama_dir, tokenizer):
    rows = cipher_rows(7, 5, length=3) + cipher_rows(8, 2, length=6)  # rows of different lengths
    data = write_rows(tmp_path / "new_task.parquet", rows)
    steps, lr = 3, 0.3
    assert main(["adapt", "--checkpoint", str(tiny_llama_dir), "--data", str(data), "--n-shots", str(len(rows)),
                 "--steps", str(steps), "--lr", str(lr), "--batch-size", "16", "--device", "cpu",
                 "--output", str(tmp_path / "adapted")]) == 0
    info = json.loads((tmp_path / "adapted" / "adapt_info.json").read_text())
    assert (info["n_shots"], info["steps"], info["lr"], info["batch_size"], info["optimizer"]) == (
        len(rows), steps, lr, len(rows), "sgd")

    base = load64(tiny_llama_dir)
    # A base model's data settings are the defaults: the tokenizer's chat template is used.
    expected = ref_adapt(base, [ref_batch(rows, tokenizer, chat=True)] * steps, lr)
    adapted = load_file(tmp_path / "adapted" / "model.safetensors")
    ref_delta = deltas(params_of(base), params_of(expected))
    assert rel_err(deltas(params_of(base), adapted), ref_delta) <= 2e-5
    # The same steps on the raw prompts (no template) are a different update: the template mattered.
    raw = ref_adapt(base, [ref_batch(rows, tokenizer, chat=False)] * steps, lr)
    assert rel_err(deltas(params_of(base), params_of(raw)), ref_delta) > 0.05


def test_adapt_defaults_come_from_the_meta_training_config(tmp_path, tiny_llama_dir, tokenizer):
    """No --lr/--steps/--batch-size: SGD at the checkpoint's inner_lr for its num_inner_steps on
    batches of its inner_batch_size, tokenised with its data settings (here: no chat template)."""
    overrides, _ = write_uneven_tasks(tmp_path / "tasks", [(3, 2, 4), (3, 2, 4)])
    inner_lr, k = 0.25, 3
    assert main(["train", f"model.partial_pretrain={tiny_llama_dir}", "meta.algorithm=fomaml",
                 f"trainer.default_local_dir={tmp_path / 'run'}", "trainer.total_training_steps=1", "optim.name=sgd",
                 "meta.outer_lr=0.1", "meta.meta_batch_size=2", "meta.inner_batch_size=32", f"meta.inner_lr={inner_lr}",
                 f"meta.num_inner_steps={k}", "data.chat_template=none", "trainer.logger=[jsonl]",
                 "trainer.device=cpu", *overrides]) == 0
    checkpoint = tmp_path / "run" / "step_1"
    rows = cipher_rows(11, 6, length=5)
    data = write_rows(tmp_path / "new_task.parquet", rows)
    assert main(["adapt", "--checkpoint", str(checkpoint), "--data", str(data), "--n-shots", str(len(rows)),
                 "--device", "cpu", "--output", str(tmp_path / "adapted")]) == 0
    info = json.loads((tmp_path / "adapted" / "adapt_info.json").read_text())
    assert (info["steps"], info["lr"], info["batch_size"]) == (k, inner_lr, len(rows))

    theta = load64(checkpoint)
    expected = ref_adapt(theta, [ref_batch(rows, tokenizer, chat=False)] * k, inner_lr)
    adapted = load_file(tmp_path / "adapted" / "model.safetensors")
    assert rel_err(deltas(params_of(theta), adapted), deltas(params_of(theta), params_of(expected))) <= 2e-5


@pytest.mark.slow
def test_adapt_on_fewer_shots_uses_exactly_n_of_the_rows(tmp_path, tiny_llama_dir, tokenizer):
    """With n_shots < rows, exactly one n-subset of the file reproduces the update (whole-set
    batches), and it is the same subset for the same seed."""
    rows = cipher_rows(21, 5, length=4)
    data = write_rows(tmp_path / "new_task.parquet", rows)
    n, steps, lr = 3, 2, 0.3
    for out in ("a", "b"):
        assert main(["adapt", "--checkpoint", str(tiny_llama_dir), "--data", str(data), "--n-shots", str(n),
                     "--steps", str(steps), "--lr", str(lr), "--batch-size", "8", "--seed", "5", "--device", "cpu",
                     "--output", str(tmp_path / out)]) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    base = load64(tiny_llama_dir)
    theta = params_of(base)
    got = deltas(theta, a)
    errors = {}
    for subset in itertools.combinations(range(len(rows)), n):
        expected = ref_adapt(base, [ref_batch([rows[i] for i in subset], tokenizer, chat=True)] * steps, lr)
        errors[subset] = rel_err(got, deltas(theta, params_of(expected)))
    matches = [s for s, e in errors.items() if e <= 2e-5]
    assert len(matches) == 1, sorted(errors.values())[:3]
    assert sorted(errors.values())[1] > 0.05  # the runner-up subset is far off


# ----------------------------------------------------------------------------- eval

def greedy(model, ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Greedy decoding with one full forward per token: no cache, no padding, no batching."""
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
    return out


def lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    p, r = prediction.split(), reference.split()
    common = lcs(p, r)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def test_eval_metrics_equal_values_computed_by_hand(tmp_path, tiny_llama_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()
    max_new = 8
    # Prompts of different lengths, so batched generation has to left-pad correctly.
    prompts = ["map: 2 0 4 3 1", "map: 2 0 4 3 1", "What is 3 + 4?", "map: 1 5", "Hello, how are you today?"]
    generated = [tokenizer.decode(greedy(model, prompt_ids({"prompt": p}, tokenizer, chat=True), max_new,
                                         tokenizer.eos_token_id), skip_special_tokens=True) for p in prompts]
    words = [g.split() for g in generated]
    assert words[0] and len(words[2]) >= 2, generated  # the tiny model says something to compare against
    # References: the greedy output itself (its tokens then score under teacher forcing), the same
    # with other surrounding whitespace (still an exact match), a partial overlap, unrelated text.
    rows = [{"prompt": prompts[0], "response": generated[0]},
            {"prompt": prompts[1], "response": "\n " + generated[1].strip() + "  "},
            {"prompt": prompts[2], "response": f"{words[2][0]} qq {words[2][-1]}"},
            {"prompt": prompts[3], "response": "zz yy"},
            {"prompt": prompts[4], "response": " 3 2 4"}]
    data = write_rows(tmp_path / "query.parquet", rows)
    assert main(["eval", "--checkpoint", str(tiny_llama_dir), "--data", str(data), "--batch-size", "3",
                 "--max-new-tokens", str(max_new), "--predictions", "--device", "cpu",
                 "--output", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())

    batch = ref_batch(rows, tokenizer, chat=True)
    with torch.no_grad():
        want_loss = float(ref_loss(model.double(), batch))
    model.float()
    correct = total = 0
    for row in rows:  # token accuracy one unpadded row at a time
        one = ref_batch([row], tokenizer, chat=True)
        with torch.no_grad():
            predicted = model(input_ids=one["input_ids"]).logits[0, :-1].argmax(-1)
        labels = one["labels"][0, 1:]
        mask = labels != -100
        correct += int((predicted[mask] == labels[mask]).sum())
        total += int(mask.sum())
    want_em = [float(g.strip() == r["response"].strip()) for g, r in zip(generated, rows)]
    want_rouge = [rouge_l_f1(g, r["response"]) for g, r in zip(generated, rows)]

    assert result["rows"] == len(rows) and result["target_tokens"] == total == num_targets(batch)
    assert result["query_loss"] == pytest.approx(want_loss, rel=1e-5)
    assert result["token_accuracy"] == pytest.approx(correct / total, abs=1e-12)
    assert result["predictions"] == generated
    assert result["exact_match"] == pytest.approx(sum(want_em) / len(rows), abs=1e-12)
    assert result["rouge_l"] == pytest.approx(sum(want_rouge) / len(rows), abs=1e-12)
    # The case is not degenerate: every metric is strictly between its extremes.
    assert want_em[:2] == [1.0, 1.0] and 0 < result["exact_match"] < 1
    assert 0 < want_rouge[2] < 1 and 0 < result["rouge_l"] < 1
    assert 0 < correct < total  # teacher-forcing the greedy output scores its tokens


def test_evaluation_through_the_prefix_cache_equals_the_whole_model(tiny_llama_dir, tokenizer):
    """With an engine whose meta-parameters start at layer 1, the query loss and token accuracy
    (``evaluate_rows(engine=...)``, ``adapt.dataset_loss``) run layer 0 once per row, from the
    engine's prefix cache, and equal the whole model's forward (float64, rows of different lengths
    in one batch); a second evaluation reads every row back."""
    from metasft.adapt import dataset_loss
    from metasft.algorithms import InnerLoop
    from metasft.data.formatting import Example
    from metasft.data.tokenize import encode_examples
    from metasft.evaluate import evaluate_rows

    model = load64(tiny_llama_dir)
    texts = [("map: 2 0 4 3 1", "1 3 0 2 4"), ("What is 3 + 4?", "7"), ("map: 1 5", "3 2"),
             ("Hello, how are you today?", "fine, thanks")]
    examples = [Example(prompt=p, response=r) for p, r in texts]
    rows = encode_examples(examples, tokenizer, max_length=64)
    want = evaluate_rows(model, tokenizer, rows, examples, batch_size=3, with_generation=False)
    top = [(n, p) for n, p in model.named_parameters() if ".layers.1." in n or n.startswith(("model.norm", "lm_head"))]
    for name, param in model.named_parameters():
        param.requires_grad_(any(name == n for n, _ in top))
    engine = InnerLoop(model, top, 0.1, 1, prefix_cache=True)
    assert engine.split_at == 1 and engine.prefix_cache.cut == 1
    got = evaluate_rows(model, tokenizer, rows, examples, batch_size=3, with_generation=False, engine=engine)
    assert engine.prefix_cache.misses == len(rows) and engine.prefix_cache.hits == 0
    assert got["query_loss"] == pytest.approx(want["query_loss"], rel=1e-12)
    assert got["token_accuracy"] == want["token_accuracy"] and got["target_tokens"] == want["target_tokens"]
    total, count = dataset_loss(engine, rows, batch_size=2, pad_token_id=tokenizer.pad_token_id)
    assert engine.prefix_cache.misses == len(rows) and engine.prefix_cache.hits == len(rows)  # read back
    assert count == want["target_tokens"] and total / count == pytest.approx(want["query_loss"], rel=1e-12)


# ----------------------------------------------------------------------------- LoRA end to end

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft reading transformers
def test_lora_train_adapt_eval_end_to_end(tmp_path, tiny_llama_dir, tokenizer):
    overrides, _ = write_uneven_tasks(tmp_path / "tasks", [(4, 3, 4), (4, 3, 5)])
    assert main(["train", f"model.partial_pretrain={tiny_llama_dir}", "meta.algorithm=fomaml", "model.lora_rank=4",
                 "model.lora_alpha=8", f"trainer.default_local_dir={tmp_path / 'run'}",
                 "trainer.total_training_steps=2", "optim.name=adamw", "meta.outer_lr=0.01", "meta.meta_batch_size=2",
                 "meta.inner_batch_size=8", "meta.inner_lr=0.5", "meta.num_inner_steps=2", "data.chat_template=none",
                 "trainer.logger=[jsonl]", "trainer.device=cpu", *overrides]) == 0
    checkpoint = tmp_path / "run" / "step_2"
    shots = write_rows(tmp_path / "new" / "support.parquet", cipher_rows(31, 4, length=4))
    query = write_rows(tmp_path / "new" / "query.parquet", cipher_rows(31, 9, length=4)[4:])
    assert main(["adapt", "--checkpoint", str(checkpoint), "--data", str(shots), "--n-shots", "4", "--device", "cpu",
                 "--output", str(tmp_path / "adapted")]) == 0
    adapted_dir = tmp_path / "adapted"
    for name in ("adapter_model.safetensors", "adapter_config.json", "adapt_info.json", "tokenizer_config.json"):
        assert (adapted_dir / name).is_file(), name
    assert not (adapted_dir / "model.safetensors").exists()

    trained = load_file(checkpoint / "adapter_model.safetensors")
    adapted = load_file(adapted_dir / "adapter_model.safetensors")
    assert trained.keys() == adapted.keys() and len(trained) > 0
    assert any(not torch.equal(trained[k], adapted[k]) for k in trained)  # adapt moved the adapter
    # ... by exactly the checkpoint's inner loop (SGD at inner_lr, num_inner_steps, whole shot set).
    theta = AutoPeftModelForCausalLM.from_pretrained(str(checkpoint), is_trainable=True).double()
    theta.train()
    expected = get_peft_model_state_dict(ref_adapt(theta, [ref_batch(cipher_rows(31, 4, length=4), tokenizer)] * 2,
                                                   0.5))
    assert expected.keys() == adapted.keys()
    assert rel_err(deltas(trained, adapted), deltas(trained, expected)) <= 2e-5

    # Base weights are bit-identical to the model meta-training started from.
    base_state = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(adapted_dir))
    checked = 0
    for name, param in reloaded.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param, base_state[key]), name
            checked += 1
    assert checked == len(base_state)

    assert main(["eval", "--checkpoint", str(adapted_dir), "--data", str(query), "--device", "cpu",
                 "--output", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["rows"] == 5 and result["target_tokens"] > 0
    for key in ("query_loss", "token_accuracy", "exact_match", "rouge_l"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert result["query_loss"] > 0
    assert all(0 <= result[key] <= 1 for key in ("token_accuracy", "exact_match", "rouge_l"))


def test_adapt_with_adamw_equals_torch_adamw_on_the_whole_shot_set(tmp_path, tiny_llama_dir, tokenizer):
    """``--optimizer adamw``: torch.optim.AdamW with weight decay 0 (and fresh moments), step for step."""
    rows = cipher_rows(7, 5, length=3) + cipher_rows(8, 2, length=6)
    data = write_rows(tmp_path / "new_task.parquet", rows)
    steps, lr = 3, 0.01
    assert main(["adapt", "--checkpoint", str(tiny_llama_dir), "--data", str(data), "--n-shots", str(len(rows)),
                 "--steps", str(steps), "--lr", str(lr), "--batch-size", "16", "--optimizer", "adamw",
                 "--device", "cpu", "--output", str(tmp_path / "adapted")]) == 0
    assert json.loads((tmp_path / "adapted" / "adapt_info.json").read_text())["optimizer"] == "adamw"
    base = load64(tiny_llama_dir)
    model = load64(tiny_llama_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, foreach=False)
    batch = ref_batch(rows, tokenizer, chat=True)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        ref_loss(model, batch).backward()
        optimizer.step()
    adapted = load_file(tmp_path / "adapted" / "model.safetensors")
    ref_delta = deltas(params_of(base), params_of(model))
    # Adam divides by √v: elements whose gradient is ~0 move by rounding-sized amounts in either run.
    assert rel_err(deltas(params_of(base), adapted), ref_delta) <= 1e-3
    # SGD at the same lr is another update entirely.
    sgd = ref_adapt(base, [batch] * steps, lr)
    assert rel_err(deltas(params_of(base), params_of(sgd)), ref_delta) > 0.5


@pytest.mark.parametrize("share_prefix", [False, True])
def test_in_context_scores_equal_transformers_called_directly(tiny_llama_dir, tokenizer, share_prefix):
    """The in-context baseline (bench ``adaptations: [in_context]``): the row rendered by metasft and
    scored by ``evaluate_rows`` against the prompt written here with the tokenizer's chat template, its
    loss over the response tokens from one plain forward, and a plain greedy loop for the answer.

    With ``share_prefix`` (what the bench uses) the demonstrations run once and every query continues
    their keys and values: queries of three lengths, in batches of 2 with a last batch of 1, so padding
    after the prefix and rows that stop at different steps are both exercised."""
    from metasft.data.formatting import Example
    from metasft.data.in_context import render_in_context
    from metasft.evaluate import evaluate_rows, shared_prefix_length

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()
    shots = [Example(prompt=r["prompt"], response=r["response"]) for r in cipher_rows(3, 3, length=3)]
    short, long, shortest = (cipher_rows(3 + length, 2, length=length) for length in (3, 5, 2))
    queries = [Example(prompt=r["prompt"], response=r["response"])
               for r in (short[0], long[0], short[1], long[1], shortest[0])]  # each batch of 2 is uneven
    rendered = [render_in_context(shots, q, tokenizer, max_length=512)[0] for q in queries]
    if share_prefix:  # the case is not degenerate: the prefix is most of each row, and rows differ in length
        assert shared_prefix_length(rendered) > len(rendered[0].input_ids) // 2
        assert len({len(r.input_ids) for r in rendered}) == 3
    ours = evaluate_rows(model, tokenizer, rendered, queries, batch_size=2, max_new_tokens=6, share_prefix=share_prefix)

    nll, count, predictions, prompts = 0.0, 0, [], []
    for query in queries:
        messages = [m for s in shots for m in ({"role": "user", "content": s.prompt},
                                               {"role": "assistant", "content": s.response})]
        messages.append({"role": "user", "content": query.prompt})
        prompt = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
        full = tokenizer(tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": query.response}],
                                                       tokenize=False), add_special_tokens=False)["input_ids"]
        assert full[:len(prompt)] == prompt
        prompts.append(prompt)
        end = full.index(tokenizer.convert_tokens_to_ids("<|im_end|>"), len(prompt)) + 1  # through end of turn
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([full[:end]])).logits[0].double(), -1)
        nll -= sum(float(logp[t - 1, full[t]]) for t in range(len(prompt), end))
        count += end - len(prompt)
        predictions.append(tokenizer.decode(greedy(model, prompt, 6, tokenizer.eos_token_id), skip_special_tokens=True))
    assert ours["target_tokens"] == count
    assert ours["query_loss"] == pytest.approx(nll / count, rel=1e-5)
    assert ours["predictions"] == predictions
    assert ours["exact_match"] == sum(p.strip() == q.response.strip() for p, q in zip(predictions, queries)) / len(queries)
    if share_prefix:
        # Stricter than equal argmaxes: every step's logits, against a plain forward of the prompt and
        # the tokens generated so far (a wrong position or an attended pad moves them).
        from metasft.evaluate import SharedPrefix, generate_after_prefix
        steps: list = []
        prefix = SharedPrefix(model, rendered[0].input_ids[:shared_prefix_length(rendered)], torch.device("cpu"))
        generate_after_prefix(model, tokenizer, prompts, prefix, 6, 2, torch.device("cpu"), step_logits=steps)
        batches = [steps[i:i + 6] for i in range(0, len(steps), 6)]  # no row stops early here (asserted below)
        assert len(steps) == 6 * math.ceil(len(queries) / 2)
        for i, prompt in enumerate(prompts):
            generated = greedy(model, prompt, 6, tokenizer.eos_token_id)
            assert len(generated) == 6
            with torch.no_grad():
                want = model(input_ids=torch.tensor([prompt + generated[:-1]])).logits[0, len(prompt) - 1:]
            got = torch.stack([step[i % 2] for step in batches[i // 2]])
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
