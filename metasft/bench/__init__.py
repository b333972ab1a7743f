"""``metasft bench``: does meta-learning pay off? Methods × held-out tasks × n_shots × seeds.

    metasft bench --config bench.yaml

Every method — a train config to run, or an existing checkpoint; the un-meta-trained base model
and multi-task SFT are always included — is adapted to each held-out task with **one protocol**
(the same seeded shots, optimizer, learning rate, steps and batch size for all) and evaluated on
the task's query set. Outputs in ``output_dir``: ``results.csv`` (one row per method, task,
n_shots, seed), ``results.json``, ``results.md`` (mean and 95% interval over tasks × seeds) and
``adaptation.png``, with wall time and peak memory per method. A method with a ``grid`` is a
hyperparameter sweep: its variants are ranked in ``sweep.md`` and the best written to
``best_config.yaml``.
"""


from metasft.bench.command import run_bench
from metasft.bench.evaluation import evaluate_method
from metasft.bench.methods import ResolvedMethod, best_validation_step, resolve_methods, train_methods
from metasft.bench.report import markdown_table, mean_ci, plot, summarise, write_csv
from metasft.bench.schema import ADAPTATIONS, METRICS, BenchConfig, load_bench_config

__all__ = ["ADAPTATIONS", "METRICS", "BenchConfig", "ResolvedMethod", "best_validation_step", "evaluate_method",
           "load_bench_config", "markdown_table", "mean_ci", "plot", "resolve_methods", "run_bench", "summarise",
           "train_methods", "write_csv"]
