"""The bad-input matrix: every command, each mistake → exit 2, one line on stderr naming what and
where, no traceback, and nothing already written lost or half-written."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metasft.cli import main

from conftest import write_tasks


def parquet(path, rows, schema=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


GOOD = [{"prompt": f"map: {i}", "response": f" {i}"} for i in range(12)]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama_dir, tiny_qwen2_dir, tokenizer_dir):
    """Files the cases point at, built once."""
    root = tmp_path_factory.mktemp("bad")
    w = {"root": root, "llama": tiny_llama_dir, "qwen": tiny_qwen2_dir, "tok": tokenizer_dir}
    w["good"] = parquet(root / "good.parquet", GOOD)
    w["tasks"] = write_tasks(root / "tasks", 3, 6, 4)
    (root / "empty.parquet").write_bytes(b"")
    w["empty"] = root / "empty.parquet"
    truncated = root / "truncated.parquet"
    truncated.write_bytes(w["good"].read_bytes()[:-40])
    w["truncated"] = truncated
    (root / "not.parquet").write_text("prompt,response\na,b\n")
    w["notparquet"] = root / "not.parquet"
    w["wrongcols"] = parquet(root / "wrongcols.parquet", [{"question": "a", "answer": "b"}])
    w["nonstring"] = parquet(root / "nonstring.parquet", [{"prompt": "a", "response": 3}])
    w["nulls"] = parquet(root / "nulls.parquet", [{"prompt": "a", "response": "b"}, {"prompt": None, "response": "b"}])
    w["zero_rows"] = parquet(root / "zero.parquet", [], schema=pa.schema([("prompt", pa.string()), ("response", pa.string())]))
    w["long"] = parquet(root / "long.parquet", [{"prompt": "x " * 400, "response": "y"}])
    (root / "wrong.csv").write_text("a,b\n1,2\n")
    w["csv"] = root / "wrong.csv"
    (root / "afile").write_text("I am a file")
    w["afile"] = root / "afile"
    (root / "partial_ckpt").mkdir()
    (root / "partial_ckpt" / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    w["partial"] = root / "partial_ckpt"
    w["used_output"] = root / "used_output"
    (w["used_output"]).mkdir()
    (w["used_output"] / "keep.txt").write_text("precious")
    # A checkpoint of another model (Qwen2) to resume a Llama run from.
    assert main(["train", f"model.partial_pretrain={tiny_qwen2_dir}", "meta.meta_batch_size=1", "meta.num_inner_steps=1",
                 "trainer.total_training_steps=1", "data.chat_template=none", "trainer.logger=[jsonl]",
                 f"trainer.default_local_dir={root / 'qwen_run'}", *w["tasks"]]) == 0
    w["qwen_ckpt"] = root / "qwen_run" / "step_1"

    def task_config(entry):
        path = root / f"tc_{abs(hash(json.dumps(entry, sort_keys=True)))}.json"
        path.write_text(json.dumps(entry))
        return path
    w["task_config"] = task_config
    return w


def train(w, *extra):
    return ["train", f"model.partial_pretrain={w['llama']}", "meta.meta_batch_size=2", "meta.num_inner_steps=1",
            "trainer.total_training_steps=1", "data.chat_template=none", "trainer.logger=[jsonl]",
            f"trainer.default_local_dir={w['root'] / 'runs' / 'x'}", *w["tasks"], *extra]


def one_task(w, support, query=None):
    return [f"meta.tasks=[{{name: t, support_files: [{support}], query_files: [{query or w['good']}]}}]",
            "meta.meta_batch_size=1"]


CASES = {
    # prepare
    "prepare: task config missing": (lambda w: ["prepare", "--config", str(w["root"] / "nope.json"), "--output-dir", str(w["root"] / "o")], "nope.json: task config not found"),
    "prepare: task config not JSON": (lambda w: ["prepare", "--config", str(w["csv"]), "--output-dir", str(w["root"] / "o")], "wrong.csv"),
    "prepare: task config is a list": (lambda w: ["prepare", "--config", str(w["task_config"]([1, 2])), "--output-dir", str(w["root"] / "o")], "expected a mapping of task name"),
    "prepare: entry without input_file": (lambda w: ["prepare", "--config", str(w["task_config"]({"t": {}})), "--output-dir", str(w["root"] / "o")], "task 't': missing key 'input_file'"),
    "prepare: input file missing": (lambda w: ["prepare", "--config", str(w["task_config"]({"t": {"input_file": str(w["root"] / "gone.parquet")}})), "--output-dir", str(w["root"] / "o")], "gone.parquet: file not found"),
    "prepare: empty file": (lambda w: ["prepare", "--config", str(w["task_config"]({"t": {"input_file": str(w["empty"])}})), "--output-dir", str(w["root"] / "o")], "empty.parquet: file is empty"),
    "prepare: truncated parquet": (lambda w: ["prepare", "--config", str(w["task_config"]({"t": {"input_file": str(w["truncated"])}})), "--output-dir", str(w["root"] / "o")], "truncated.parquet: not a readable parquet file"),
    "prepare: not parquet": (lambda w: ["prepare", "--config", str(w["task_config"]({"t": {"input_file": str(w["notparquet"])}})), "--output-dir", str(w["root"] / "o")], "not.parquet: not a readable parquet file"),
    "prepare: wrong columns": (lambda w: ["prepare", "--config", str(w["task_config"]({"t": {"input_file": str(w["wrongcols"])}})), "--output-dir", str(w["root"] / "o")], "missing column 'prompt'"),
    "prepare: non-string column": (lambda w: ["prepare", "--config", str(w["task_config"]({"t": {"input_file": str(w["nonstring"])}})), "--output-dir", str(w["root"] / "o")], "row 0: column 'response' is int"),
    "prepare: empty task": (lambda w: ["prepare", "--config", str(w["task_config"]({"t": {"input_file": str(w["zero_rows"])}})), "--output-dir", str(w["root"] / "o")], "zero.parquet: file has no rows"),
    "prepare: task name escapes": (lambda w: ["prepare", "--config", str(w["task_config"]({"../x": {"input_file": str(w["good"])}})), "--output-dir", str(w["root"] / "o")], "must not contain path separators"),
    "prepare: output dir is a file": (lambda w: ["prepare", "--config", str(w["task_config"]({"t": {"input_file": str(w["good"])}})), "--output-dir", str(w["afile"])], "afile"),
    "prepare: negative size": (lambda w: ["prepare", "--config", str(w["task_config"]({"t": {"input_file": str(w["good"])}})), "--output-dir", str(w["root"] / "o"), "--support-size", "-3"], "--support-size: -3 must be >= 1"),
    # inspect
    "inspect: data missing": (lambda w: ["inspect", str(w["root"] / "gone.jsonl"), "--tokenizer", str(w["tok"])], "gone.jsonl: file not found"),
    "inspect: tokenizer missing": (lambda w: ["inspect", str(w["good"]), "--tokenizer", str(w["root"] / "notok")], "cannot load tokenizer"),
    "inspect: zero max length": (lambda w: ["inspect", str(w["good"]), "--tokenizer", str(w["tok"]), "--max-length", "0"], "--max-length: 0 must be >= 2"),
    "inspect: row too long": (lambda w: ["inspect", str(w["long"]), "--tokenizer", str(w["tok"]), "--max-length", "32"], "long.parquet row 0"),
    "inspect: csv wrong columns": (lambda w: ["inspect", str(w["csv"]), "--tokenizer", str(w["tok"])], "missing column 'prompt'"),
    # train
    "train: unknown key": (lambda w: train(w, "meta.inner_steps=3"), "meta.inner_steps: unknown config key; did you mean meta.num_inner_steps?"),
    "train: mistyped value": (lambda w: train(w, "meta.meta_batch_size=two"), "meta.meta_batch_size: expected an integer"),
    "train: contradictory keys": (lambda w: train(w, "meta.use_fomaml=true", "meta.algorithm=reptile"), "contradicts meta.algorithm=reptile"),
    "train: negative learning rate": (lambda w: train(w, "meta.inner_lr=-0.1"), "meta.inner_lr: -0.1 must be > 0"),
    "train: zero batch size": (lambda w: train(w, "meta.inner_batch_size=0"), "meta.inner_batch_size: 0 must be >= 1"),
    "train: meta-batch larger than tasks": (lambda w: train(w, "meta.meta_batch_size=9"), "meta.meta_batch_size: 9 is larger than the 3 meta-training tasks"),
    "train: maml under fsdp": (lambda w: train(w, "meta.algorithm=maml", "model.use_fsdp=true"), "second-order maml is not supported"),
    "train: task batching under fsdp": (lambda w: train(w, "meta.task_batching=true", "model.use_fsdp=true"),
                                        "meta.task_batching=true: not supported under FSDP"),
    "train: task file missing": (lambda w: train(w, *one_task(w, w["root"] / "gone.parquet")), "gone.parquet: file not found"),
    "train: empty task": (lambda w: train(w, *one_task(w, w["zero_rows"])), "zero.parquet: file has no rows"),
    "train: null value": (lambda w: train(w, *one_task(w, w["nulls"])), "nulls.parquet row 1: column 'prompt' is null"),
    "train: row too long": (lambda w: train(w, *one_task(w, w["long"]), "data.max_length=32"), "long.parquet row 0"),
    "train: model missing": (lambda w: train(w, f"model.partial_pretrain={w['root'] / 'nomodel'}"), "model.partial_pretrain: cannot load"),
    "train: run dir not writable": (lambda w: train(w, f"trainer.default_local_dir={w['afile'] / 'run'}"), "trainer.default_local_dir: cannot create"),
    "train: resume path missing": (lambda w: train(w, f"trainer.resume_mode={w['root'] / 'nockpt'}"), "trainer.resume_mode: checkpoint"),
    "train: checkpoint of another model": (lambda w: train(w, f"trainer.resume_mode={w['qwen_ckpt']}"), "weights do not fit this model"),
    # adapt
    "adapt: checkpoint missing": (lambda w: ["adapt", "--checkpoint", str(w["root"] / "nock"), "--data", str(w["good"]), "--n-shots", "2", "--output", str(w["root"] / "ad")], "no such checkpoint directory"),
    "adapt: partial checkpoint": (lambda w: ["adapt", "--checkpoint", str(w["partial"]), "--data", str(w["good"]), "--n-shots", "2", "--lr", "0.1", "--steps", "1", "--output", str(w["root"] / "ad")], "partial_ckpt"),
    "adapt: zero shots": (lambda w: ["adapt", "--checkpoint", str(w["llama"]), "--data", str(w["good"]), "--n-shots", "0", "--output", str(w["root"] / "ad")], "--n-shots: 0 must be >= 1"),
    "adapt: more shots than rows": (lambda w: ["adapt", "--checkpoint", str(w["llama"]), "--data", str(w["good"]), "--n-shots", "50", "--lr", "0.1", "--steps", "1", "--output", str(w["root"] / "ad")], "--n-shots: 50 exceeds the 12 rows"),
    "adapt: output not empty": (lambda w: ["adapt", "--checkpoint", str(w["llama"]), "--data", str(w["good"]), "--n-shots", "2", "--output", str(w["used_output"])], "already exists and is not empty"),
    # eval
    "eval: not a model directory": (lambda w: ["eval", "--checkpoint", str(w["root"] / "tasks"), "--data", str(w["good"])], "not a model directory"),
    "eval: data missing": (lambda w: ["eval", "--checkpoint", str(w["llama"]), "--data", str(w["root"] / "gone.parquet")], "gone.parquet: file not found"),
    "eval: bad batch size": (lambda w: ["eval", "--checkpoint", str(w["llama"]), "--data", str(w["good"]), "--batch-size", "0"], "--batch-size: 0 must be >= 1"),
    # bench
    "bench: config missing": (lambda w: ["bench", "--config", str(w["root"] / "nobench.yaml")], "nobench.yaml: config file not found"),
    "bench: unknown key": (lambda w: ["bench", "--config", str(w["task_config"]({"base_model": "x", "tasks_dir": "y", "speed": 1}))], "speed: unknown config key"),
    "bench: prefix cache folder is a file": (lambda w: ["bench", "--config", str(w["task_config"]({"base_model": "x", "tasks_dir": "y", "prefix_cache_dir": str(w["afile"])}))],
                                            "afile is a file, not a directory"),
    # demo
    "demo: zero steps": (lambda w: ["demo", "--steps", "0", "--out", str(w["root"] / "demo")], "--steps: 0 must be >= 1"),
    "demo: unknown method": (lambda w: ["demo", "--methods", "fomaml,magic", "--out", str(w["root"] / "demo")], "unknown method 'magic'"),
    "demo: real model, zero steps": (lambda w: ["demo", "--model", "smollm2-135m", "--steps", "0", "--out", str(w["root"] / "demo")],
                                     "--steps: 0 must be >= 1"),
    "demo: real model, unknown method": (lambda w: ["demo", "--model", "smollm2-135m", "--methods", "maml", "--out",
                                                    str(w["root"] / "demo")], "unknown method 'maml' for --model smollm2-135m"),
    "demo: --fresh without --model": (lambda w: ["demo", "--fresh", "--out", str(w["root"] / "demo")], "--fresh: only with --model"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, world, capsys):
    make_args, needle = CASES[case]
    args = make_args(world)
    before = {p: p.read_bytes() for p in world["root"].rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert needle in err[0], err[0]
    assert err[0].startswith(f"metasft {args[0]}: error: ") and "Traceback" not in err[0]
    after = {p: p.read_bytes() for p in world["root"].rglob("*") if p.is_file()}
    assert {p: after[p] for p in before} == before, "an existing file changed"
    stray = [p for p in after if p not in before and (".tmp" in p.name or p.name.startswith((".prepare", ".step")))]
    assert not stray, stray
    assert not (world["root"].parent / "x").exists()  # '../x' never escapes the output directory


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 30
