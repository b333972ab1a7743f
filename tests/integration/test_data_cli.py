"""`metasft prepare`, `metasft inspect` and `metasft configs` through the real CLI, including the
one-line exit-2 errors of SPEC §9."""

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metasft.cli import main

import procs


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def run_cli(*args):
    """Run the real program in a subprocess (as a user would) and return (code, stdout, stderr)."""
    proc = procs.run([sys.executable, "-m", "metasft", *map(str, args)], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_inspect_json_gives_verl_inputs_and_response_targets(tmp_path, tokenizer_dir, tokenizer, capsys):
    rows = [{"prompt": "map: 1 2", "response": " 3 4"}, {"prompt": "what is up", "response": "the sky"}]
    data = write_parquet(tmp_path / "d.parquet", rows)
    assert main(["inspect", str(data), "--tokenizer", str(tokenizer_dir), "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 2
    for row, obj in zip(rows, out):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                               add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(row["response"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        assert obj["input_ids"] == p_ids + r_ids
        assert obj["target_mask"] == [0] * len(p_ids) + [1] * len(r_ids)
        assert obj["attention_mask"] == [1] * len(obj["input_ids"])
        assert obj["position_ids"] == list(range(len(obj["input_ids"])))


def test_inspect_pads_like_verl_when_asked(tmp_path, tokenizer_dir, capsys):
    data = write_parquet(tmp_path / "d.parquet", [{"prompt": "a", "response": "b"}])
    main(["inspect", str(data), "--tokenizer", str(tokenizer_dir), "--json", "--max-length", "40", "--pad-to-max-length"])
    obj = json.loads(capsys.readouterr().out)
    n = sum(obj["attention_mask"])
    assert len(obj["input_ids"]) == 40 and obj["attention_mask"][n:] == [0] * (40 - n)
    assert obj["target_mask"][n:] == [0] * (40 - n)


def test_inspect_pretty_view(tmp_path, tokenizer_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    assert main(["inspect", str(data), "--tokenizer", str(tokenizer_dir)]) == 0
    out = capsys.readouterr().out
    assert "row 0" in out and "hello" in out and "trained on" in out


def test_prepare_cli_seed_command_line(tmp_path):
    for name in ("medical", "legal"):
        write_parquet(tmp_path / f"{name}.parquet",
                      [{"prompt": f"{name} q{i}", "response": f"a{i}"} for i in range(30)] + [{"prompt": f"{name} q0", "response": "a0"}])
    config = tmp_path / "task_config.json"
    config.write_text(json.dumps({name: {"input_file": str(tmp_path / f"{name}.parquet"), "support_ratio": 0.5,
                                         "max_samples": 1000} for name in ("medical", "legal")}))
    code, out, err = run_cli("prepare", "--config", config, "--output-dir", tmp_path / "data/maml", "--balance",
                             "--support-size", 10, "--query-size", 15, "--seed", 7)
    assert code == 0, err
    assert "medical" in out and "1 duplicate" in out
    manifest = json.loads((tmp_path / "data/maml/manifest.json").read_text())
    assert manifest["tasks"]["legal"]["support_rows"] == 10 and manifest["tasks"]["legal"]["query_rows"] == 15
    assert manifest["seed"] == 7 and manifest["options"]["balance"] is True


@pytest.mark.parametrize("setup,args,needle", [
    (lambda p: None, ["prepare", "--config", "{p}/missing.json", "--output-dir", "{p}/out"], "missing.json: task config not found"),
    (lambda p: (p / "c.json").write_text("{bad"), ["prepare", "--config", "{p}/c.json", "--output-dir", "{p}/out"], "invalid JSON"),
    (lambda p: (p / "c.json").write_text(json.dumps({"t": {"input_file": str(p / "nope.parquet")}})),
     ["prepare", "--config", "{p}/c.json", "--output-dir", "{p}/out"], "nope.parquet: file not found"),
    (lambda p: (p / "e.parquet").write_bytes(b""), ["inspect", "{p}/e.parquet", "--tokenizer", "{tok}"], "e.parquet: file is empty"),
    (lambda p: write_parquet(p / "w.parquet", [{"question": "a", "answer": "b"}]),
     ["inspect", "{p}/w.parquet", "--tokenizer", "{tok}"], "missing column 'prompt'"),
    (lambda p: write_parquet(p / "n.parquet", [{"prompt": "a", "response": 5}]),
     ["inspect", "{p}/n.parquet", "--tokenizer", "{tok}"], "row 0: column 'response' is int"),
    (lambda p: write_parquet(p / "l.parquet", [{"prompt": "a " * 100, "response": "b"}]),
     ["inspect", "{p}/l.parquet", "--tokenizer", "{tok}", "--max-length", "16"], "row 0: 1"),
    (lambda p: None, ["inspect", "{p}/x.parquet", "--tokenizer", "{p}/no_tokenizer"], "model.partial_pretrain: cannot load tokenizer"),
    (lambda p: None, ["train", "--config-name", "fomaml", "meta.inner_lr=-1"], "meta.inner_lr: -1.0 must be > 0"),
    (lambda p: None, ["train", "--config-name", "fomaml", "meta.bogus=1"], "meta.bogus: unknown config key"),
    (lambda p: None, ["train", "--config-name", "nope"], "no such shipped config"),
    (lambda p: None, ["train", "--config-name", "fomaml"], "model.partial_pretrain: not set"),
    (lambda p: None, ["train", "--config-name", "fomaml", "model.partial_pretrain={p}/nomodel"], "model.partial_pretrain: cannot load"),
    (lambda p: None, ["prepare", "--output-dir", "x"], "the following arguments are required: --config"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, tokenizer_dir, setup, args, needle):
    setup(tmp_path)
    args = [a.format(p=tmp_path, tok=tokenizer_dir) for a in args]
    code, out, err = run_cli(*args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    code, _, err = run_cli("prepare", "--config", tmp_path / "missing.json", "--output-dir", tmp_path / "o", "--debug")
    assert code != 0 and "Traceback" in err


def test_configs_command_lists_and_prints(capsys):
    assert main(["configs"]) == 0
    assert "meta_lora" in capsys.readouterr().out.split()
    assert main(["configs", "meta_lora"]) == 0
    assert "lora_rank: 16" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["prepare", "inspect", "train", "configs"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: metasft" in capsys.readouterr().out
