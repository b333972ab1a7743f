"""The README's real-model quickstart, run as written on a tiny local model: only the model path is
swapped for the tiny model, and training is cut to one meta-step (so `step_1000` becomes `step_1`).
The torchrun line is covered by tests/distributed, the bench line by test_bench_cli."""

import json
import re
import shlex
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metasft.cli import main

from conftest import cipher_rows

README = Path(__file__).resolve().parents[2] / "README.md"
MODEL_PATHS = ("/models/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "/models/qwen")


def quickstart_commands():
    section = README.read_text().split("## With a real model", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("metasft ")]


@pytest.mark.slow
def test_readme_quickstart_runs(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.chdir(tmp_path)
    config = {}
    for i, name in enumerate(("medical", "legal", "finance", "code")):
        rows = cipher_rows(10 + i, 1600, length=6)
        Path(f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        config[name] = {"input_file": f"{name}.jsonl", "support_ratio": 0.5}
    Path("task_config.json").write_text(json.dumps(config))
    new = cipher_rows(99, 40, length=6)
    Path("data/new").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(new[:20]), "data/new/support.parquet")
    pq.write_table(pa.Table.from_pylist(new[20:]), "data/new/query.parquet")
    commands = quickstart_commands()
    assert [c[1] for c in commands] == ["prepare", "inspect", "train", "train", "adapt", "eval", "bench"]
    for tokens in commands:
        if tokens[1] == "bench":
            continue
        tokens = [str(tiny_llama_dir) if t in MODEL_PATHS else t for t in tokens]
        tokens = [t.replace("=" + p, "=" + str(tiny_llama_dir)) for t in tokens for p in [next(
            (m for m in MODEL_PATHS if t.endswith("=" + m)), "\0")]]
        tokens = [t.replace("step_1000", "step_1") for t in tokens]
        if tokens[1] == "train":
            tokens += ["trainer.total_training_steps=1", "trainer.logger=[jsonl]"]
        assert main(tokens[1:]) == 0, tokens
    assert Path("checkpoints/fomaml/step_1/model.safetensors").is_file()
    assert Path("checkpoints/meta_lora/step_1/adapter_model.safetensors").is_file()
    assert Path("adapted/new/adapt_info.json").is_file()
