"""The numbers behind every table and verdict: ``mean_ci`` against scipy's Student-t interval,
``summarise`` on a hand-made table, and the demo's verdict lines against the intervals they quote,
overlapping and not."""

import io

import numpy as np
import pytest
from rich.console import Console
from scipy import stats

from metasft.bench import mean_ci, summarise
from metasft.demo import _verdict


@pytest.mark.parametrize("n", [2, 3, 5, 10, 20, 31, 32, 40, 60, 200])
def test_mean_ci_is_the_student_t_interval(n):
    values = list(np.random.default_rng(n).normal(0.4, 0.2, size=n))
    mean, half = mean_ci(values)
    low, high = stats.t.interval(0.95, n - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    assert half == pytest.approx((high - low) / 2, rel=5e-4)


def test_mean_ci_of_one_value_has_no_width():
    assert mean_ci([0.3]) == (0.3, 0.0)


def test_summarise_groups_by_method_adaptation_and_shots():
    rows = [
        {"method": "sft", "adaptation": "gradient", "n_shots": 5, "exact_match": 0.2, "query_loss": 1.0,
         "token_accuracy": 0.5, "rouge_l": None},
        {"method": "sft", "adaptation": "gradient", "n_shots": 5, "exact_match": 0.4, "query_loss": 3.0,
         "token_accuracy": 0.7, "rouge_l": None},
        {"method": "sft", "adaptation": "in_context", "n_shots": 5, "exact_match": 0.0, "query_loss": 9.0,
         "token_accuracy": 0.1, "rouge_l": 0.0, "shots_used": 3},
        {"method": "fomaml", "adaptation": "gradient", "n_shots": 10, "exact_match": 1.0, "query_loss": 0.1,
         "token_accuracy": 1.0, "rouge_l": 1.0},
    ]
    summary = {(e["method"], e["adaptation"], e["n_shots"]): e for e in summarise(rows)}
    assert set(summary) == {("sft", "gradient", 5), ("sft", "in_context", 5), ("fomaml", "gradient", 10)}
    sft = summary[("sft", "gradient", 5)]
    assert sft["n"] == 2 and sft["exact_match"] == pytest.approx(0.3) and sft["query_loss"] == pytest.approx(2.0)
    # Two values 0.2 apart: sd = 0.1414, half-width = t(0.975, 1) * sd / sqrt(2) = 12.706 * 0.1.
    assert sft["exact_match_ci95"] == pytest.approx(stats.t.ppf(0.975, 1) * 0.1, rel=1e-4)
    assert "rouge_l" not in sft  # no value to average
    assert summary[("sft", "in_context", 5)]["shots_used"] == 3
    assert summary[("fomaml", "gradient", 10)]["exact_match_ci95"] == 0.0


def verdict_lines(summary, n_shots=5):
    out = io.StringIO()
    _verdict({"summary": summary}, Console(file=out, width=300), n_shots)
    return out.getvalue().strip().splitlines()


def entry(method, em, ci, adaptation="gradient", n_shots=5):
    return {"method": method, "adaptation": adaptation, "n_shots": n_shots, "exact_match": em, "exact_match_ci95": ci}


def test_verdict_lines_follow_from_the_intervals():
    summary = [entry("base", 0.0, 0.0), entry("sft", 0.20, 0.05), entry("fomaml", 0.60, 0.10),
               entry("reptile", 0.30, 0.06), entry("maml", 0.20, 0.30), entry("fomaml", 0.9, 0.0, n_shots=10),
               entry("sft", 0.0, 0.0, adaptation="in_context")]
    lines = verdict_lines(summary)
    assert lines[0] == "In context at 5 shots (no gradient step), exact match: sft 0.000."
    by_method = {line.split(" shots ", 1)[1].split(" ", 1)[0]: line for line in lines[1:]}
    assert set(by_method) == {"fomaml", "reptile", "maml"}  # base is never compared; 10 shots not shown
    # 0.60 - 0.10 = 0.50 > 0.20 + 0.05: separated.
    assert by_method["fomaml"] == ("At 5 shots fomaml beats multi-task SFT on held-out tasks: exact match 0.600 vs "
                                   "0.200 (+0.400, 95% intervals do not overlap).")
    # 0.30 - 0.06 = 0.24 < 0.25: the means differ, the intervals overlap.
    assert by_method["reptile"] == ("At 5 shots reptile does not beat multi-task SFT on held-out tasks: exact match "
                                    "0.300 vs 0.200 (+0.100).")
    assert "does not beat" in by_method["maml"]


def test_no_verdict_without_the_sft_baseline():
    assert verdict_lines([entry("fomaml", 0.6, 0.1)]) == []


def test_the_real_model_verdict_is_against_the_best_baseline_in_either_adaptation():
    """The LLM demo compares each meta method with the best of the base and SFT, adapted by gradient
    steps or in context: here SFT in context (0.40) beats SFT by gradient (0.25)."""
    summary = [entry("base", 0.20, 0.02), entry("sft", 0.25, 0.03), entry("base", 0.22, 0.02, "in_context"),
               entry("sft", 0.40, 0.05, "in_context"), entry("fomaml", 0.60, 0.10), entry("anil", 0.50, 0.06)]
    out = io.StringIO()
    _verdict({"summary": summary}, Console(file=out, width=300), 5, shots_word="shots per class", against_best=True)
    lines = out.getvalue().strip().splitlines()
    assert lines[1] == ("At 5 shots per class fomaml beats the best baseline (sft in context) on held-out tasks: "
                        "exact match 0.600 vs 0.400 (+0.200, 95% intervals do not overlap).")
    # 0.50 - 0.06 = 0.44 < 0.45: overlapping intervals.
    assert lines[2].startswith("At 5 shots per class anil does not beat the best baseline (sft in context)")
    assert len(lines) == 3


def test_a_plot_without_labelled_lines_is_written_without_an_empty_legend(tmp_path):
    """A run that never evaluated on validation tasks gives training curves with no point to draw:
    the figure is still written, and matplotlib is not asked for a legend of nothing (it warns)."""
    import warnings

    from metasft.bench.report import plot_training_curves

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_training_curves({"sft": [{"step": None, "seconds": None, "value": 0.2}]}, "exact_match",
                             tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
