"""`metasft demo` end to end: budgeted in steps, seeded, and showing the effect it exists to show."""

import csv
import json

import pytest

from metasft.cli import main


def _exact_match(path, method: str, n_shots: str = "10") -> float:
    values = [float(r["exact_match"]) for r in csv.DictReader(open(path))
              if r["method"] == method and r["n_shots"] == n_shots]
    return sum(values) / len(values)


def test_demo_same_seed_same_results_and_every_stage_written(tmp_path):
    """A small budget twice with one seed: identical results.csv, whatever the machine's speed."""
    args = ["demo", "--steps", "2", "--pretrain-steps", "3", "--methods", "fomaml", "--n-shots", "10", "--seed", "7"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "results.csv").read_text() == (b / "results.csv").read_text()
    manifest = json.loads((a / "data" / "manifest.json").read_text())
    assert (len(manifest["train_tasks"]), len(manifest["validation_tasks"]), len(manifest["held_out_tasks"])) == (200, 10, 20)
    result = json.loads((a / "results.json").read_text())
    # Equal forward/backward passes: SFT's step is one pass per task, FOMAML's K + 1 = 6.
    assert result["methods"]["fomaml"]["steps"] == 2 and result["methods"]["sft"]["steps"] == 12
    assert set(result["training_curves"]) == {"sft", "fomaml"}
    assert (a / "training_curves.png").stat().st_size > 10_000 and (a / "validation.csv").is_file()
    assert "runs/pretrain/step_3" in result["config"]["base_model"]
    # Another seed draws other keys.
    assert main(args[:-1] + ["8", "--out", str(tmp_path / "c")]) == 0
    other = json.loads((tmp_path / "c" / "data" / "manifest.json").read_text())
    assert other["tasks"]["cipher_000"]["key"] != manifest["tasks"]["cipher_000"]["key"]


@pytest.mark.slow
def test_fomaml_beats_multitask_sft_on_held_out_keys(tmp_path):
    """The effect at a fixed step budget: FOMAML and SFT with equal forward/backward passes from the
    pretrained base, each adapted at the lr its validation tasks chose; scored on unseen keys."""
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "300", "--methods", "fomaml", "--n-shots", "10", "--seed", "11",
                 "--out", str(out)]) == 0
    fomaml, sft = _exact_match(out / "results.csv", "fomaml"), _exact_match(out / "results.csv", "sft")
    assert fomaml - sft >= 0.3, (fomaml, sft)
