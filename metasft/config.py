"""Typed configuration: a schema with a help text per key, YAML files and dotted overrides.

    cfg = load_config(path="configs/fomaml.yaml", overrides=["meta.inner_lr=1e-4"])
    cfg = load_config(name="meta_lora")           # a config shipped in metasft/configs/

Key names follow the seed project and verl (SPEC §4). Validation lives in one place
(:meth:`Config.validate`); every error is a :class:`~metasft.errors.ConfigError` naming the dotted
key. The schema is also what ``docs/configuration.md`` is generated from.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from metasft.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"
LOGGERS = ("console", "jsonl", "tensorboard", "wandb")


def _f(default: Any, help: str) -> Any:
    """A schema field with its help text; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TaskSpec:
    name: str = _f("", "Task name (a directory name: no path separators).")
    support_files: list[str] = _f([], "Files of support examples (inner-loop adaptation).")
    query_files: list[str] = _f([], "Files of query examples (meta-loss and evaluation).")
    held_out: bool = _f(False, "Held out from meta-training; used only for evaluation.")
    validation: bool = _f(False, "A held-out task for choices (bench's adaptation lr, training curves), "
                                 "never for final scores; implies held_out.")


@dataclass
class ModelConfig:
    partial_pretrain: Optional[str] = _f(None, "Model to start from: a local directory or a hub id (AutoModelForCausalLM).")
    tokenizer_path: Optional[str] = _f(None, "Tokenizer directory or hub id; defaults to model.partial_pretrain.")
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the model repository. Off unless you trust it.")
    attn_implementation: Optional[str] = _f(None, "Attention kernel: eager, sdpa, ... (null = transformers' default). "
                                                  "Second-order MAML forces a double-backward-safe path itself.")
    lora_rank: int = _f(0, "LoRA rank; > 0 meta-learns only LoRA adapters (META-LoRA with fomaml), base weights frozen.")
    lora_alpha: int = _f(16, "LoRA scaling numerator (scale = lora_alpha / lora_rank).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch.")
    target_modules: Union[str, list[str]] = _f("all-linear", "Modules that get LoRA adapters: a list of names, or 'all-linear' (every linear layer but the output head).")
    lora_full_head: bool = _f(False, "Give lm_head (which must be in target_modules) a full-rank adapter: rank = "
                                     "hidden size, lora_A = identity, lora_B = 0, scale 1. It is a zero-initialised "
                                     "head delta kept apart from tied embeddings; one SGD step on it from zero is a "
                                     "prototype classifier over the full features, where a low-rank head adapter "
                                     "sees them through a random projection.")
    enable_gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    use_fsdp: bool = _f(False, "Shard parameters with FSDP2 across ranks instead of task-parallel replicas.")
    train_top_layers: Optional[int] = _f(None, "Meta-learn only the last N decoder layers, the final norm and the head "
                                               "(their LoRA adapters under LoRA); everything below stays frozen and, "
                                               "with trainer.prefix_cache, is computed once per row for the run. "
                                               "null = every trainable parameter.")


@dataclass
class MetaConfig:
    algorithm: Optional[str] = _f(
        None, "maml (second order), fomaml (first order), reptile, sft (multi-task baseline), or metaicl "
              "(multi-task SFT on rows of meta.metaicl_demos same-task demonstrations + one example). "
              "null = fomaml, or maml when meta.use_fomaml is false.")
    use_fomaml: Optional[bool] = _f(None, "Seed-compatible switch: true selects fomaml, false selects maml.")
    inner_lr: float = _f(1e-4, "Inner-loop SGD learning rate (alpha).")
    num_inner_steps: int = _f(5, "Inner adaptation steps K per task.")
    inner_optimizer: Literal["sgd", "adam"] = _f("sgd", "Inner-loop optimizer; adam is allowed for reptile only.")
    outer_lr: float = _f(1e-5, "Outer (meta) learning rate; for reptile with optim.name=sgd this is epsilon.")
    meta_batch_size: int = _f(4, "Tasks per meta-step (sampled without replacement when <= the number of tasks).")
    inner_batch_size: int = _f(8, "Support examples per inner step (the whole support set when at least its size).")
    query_batch_size: int = _f(8, "Query examples per task for the meta-loss (the whole query set when at least its size).")
    task_batching: Union[bool, Literal["auto"]] = _f(
        "auto", "Adapt the tasks of a meta-step together in one batched pass (torch.func.vmap over per-task "
                "weights): true, false, or auto = on for maml/fomaml/reptile when a pass gets >= 2 tasks, nothing "
                "rules it out (FSDP, activation checkpointing) and it was measured worth it (models up to 10M "
                "parameters, full weights or LoRA), else off. Same meta-gradient to rounding.")
    tasks_per_pass: Optional[int] = _f(None, "With task batching: at most this many tasks per batched pass (null = all "
                                             "of a rank's tasks). Full-weight batching holds one copy of the weights "
                                             "per task in a pass; lower this to trade speed for memory.")
    learn_inner_lr: Literal["none", "per_tensor", "per_tensor_per_step"] = _f(
        "none", "Meta-learn the inner learning rate (Meta-SGD / MAML++): none (one fixed meta.inner_lr), "
                "per_tensor (an α per meta-parameter tensor), or per_tensor_per_step (one per tensor and inner "
                "step). maml and fomaml only; initialised at meta.inner_lr, kept >= 0; saved in each "
                "checkpoint's inner_lrs.safetensors and used by adapt/bench.")
    inner_scope: str = _f("all", "What the inner loop adapts, within the meta-parameters: all, head (the output "
                                 "projection, or its LoRA adapter), or top_layers:N (the last N decoder layers, the "
                                 "final norm and the head). The outer loop still trains every meta-parameter. "
                                 "maml/fomaml with head is ANIL; reptile moves only what the inner loop moved.")
    inner_lr_lr: float = _f(1e-3, "Outer learning rate of the learned inner rates (their own optimizer group, "
                                  "same schedule, no weight decay, not clipped).")
    metaicl_demos: int = _f(4, "metaicl: demonstrations of the same task rendered before each training example "
                               "(fewer when data.max_length does not fit them).")
    metaicl_loss: Literal["target", "all"] = _f("target", "metaicl: train on the final example's response only, or "
                                                          "on every demonstration's response too.")
    tasks: list[TaskSpec] = _f([], "Tasks listed explicitly: name, support_files, query_files, held_out.")
    tasks_dir: Optional[str] = _f(None, "A directory written by `metasft prepare` (uses its manifest.json).")


@dataclass
class DataConfig:
    prompt_key: str = _f("prompt", "Column holding the prompt (dotted for nested dicts, e.g. extra_info.question).")
    response_key: str = _f("response", "Column holding the response.")
    messages_key: str = _f("messages", "Column holding multi-turn conversations (list of {role, content}).")
    max_length: int = _f(1024, "Maximum tokens per row (prompt + response).")
    truncation: Literal["error", "left", "right"] = _f("error", "What to do with rows longer than max_length.")
    chat_template: Literal["auto", "none"] = _f("auto", "auto: use the tokenizer's chat template when it has one; none: raw prompt text.")


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = _f("adamw", "Outer optimizer.")
    weight_decay: float = _f(0.0, "Decoupled weight decay (AdamW) or L2 (SGD).")
    betas: list[float] = _f([0.9, 0.95], "AdamW betas.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    momentum: float = _f(0.0, "SGD momentum.")
    clip_grad: Optional[float] = _f(1.0, "Clip the meta-gradient's global norm to this value (null = off).")
    lr_scheduler: Literal["constant", "cosine", "linear"] = _f("constant", "Outer learning-rate schedule after warmup.")
    warmup_steps_ratio: float = _f(0.0, "Fraction of total_training_steps spent in linear warmup.")
    min_lr_ratio: float = _f(0.0, "Final learning rate of cosine/linear decay, as a fraction of outer_lr.")


@dataclass
class TrainerConfig:
    default_local_dir: str = _f("checkpoints/metasft", "Run directory: checkpoints step_<N>/ and metrics.jsonl.")
    project_name: str = _f("metasft", "Project name for loggers (wandb, tensorboard).")
    experiment_name: str = _f("run", "Experiment name for loggers.")
    total_training_steps: int = _f(100, "Number of meta-steps.")
    save_freq: int = _f(-1, "Save a checkpoint every N meta-steps (-1 = only the last step, which is always saved).")
    keep: Optional[int] = _f(None, "Keep only the newest N checkpoints (null = keep all).")
    test_freq: int = _f(-1, "Adapt to held-out tasks and log their query loss every N meta-steps (-1 = off). "
                            "When the data has validation tasks, only those are used (logged as val/...).")
    test_exact_match_rows: int = _f(0, "With test_freq: also generate for this many query rows of each evaluated "
                                       "task after adaptation and log exact match (0 = off; not under FSDP).")
    logger: list[str] = _f(["console", "jsonl"], "Metric sinks: console, jsonl, tensorboard, wandb.")
    seed: int = _f(42, "Seed for task sampling, batch schedules and initialisation.")
    resume_mode: str = _f("auto", "auto (newest checkpoint in default_local_dir), disable, or a checkpoint path.")
    precision: Literal["fp32", "bf16"] = _f("fp32", "fp32, or bf16 autocast with fp32 master weights.")
    device: str = _f("auto", "auto (cuda when available), cpu, cuda or cuda:N.")
    time_budget_s: Optional[float] = _f(None, "Stop (and save) after the meta-step that passes this many seconds of training (null = run all steps).")
    prefix_cache: bool = _f(True, "When the layers below the meta-parameters are frozen (model.train_top_layers), "
                                  "keep their hidden states per row in memory for the run instead of recomputing "
                                  "them every meta-step.")
    prefix_cache_dir: Optional[str] = _f(None, "Keep trainer.prefix_cache's rows on disk in this folder instead of in "
                                               "memory (a subfolder per frozen model, so runs of the same model can "
                                               "share it). null: in memory, unless the rows are estimated to need more "
                                               "than half the available memory; then <default_local_dir>/prefix_cache.")
    log_freq: int = _f(1, "Log metrics every N meta-steps; the pre-adaptation query loss (one extra forward per task) is computed only on these steps.")
    max_nonfinite_steps: int = _f(5, "Stop after this many consecutive meta-steps with a non-finite loss or gradient.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        config = _build(cls, data, prefix="")
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def validate(self) -> None:
        """Check values and combinations; resolve ``meta.algorithm`` from ``meta.use_fomaml``."""
        meta, model, data, optim, trainer = self.meta, self.model, self.data, self.optim, self.trainer
        if meta.use_fomaml is not None and meta.algorithm is not None:
            wanted = "fomaml" if meta.use_fomaml else "maml"
            if meta.algorithm != wanted:
                raise ConfigError(
                    f"meta.use_fomaml={str(meta.use_fomaml).lower()} contradicts meta.algorithm={meta.algorithm}; set one"
                )
        if meta.algorithm is None:
            meta.algorithm = "maml" if meta.use_fomaml is False else "fomaml"
        from metasft.algorithms import ALGORITHMS

        if meta.algorithm not in ALGORITHMS:
            raise ConfigError(f"meta.algorithm: {meta.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        algorithm = ALGORITHMS[meta.algorithm]  # what it supports is declared on the class
        _positive("meta.inner_lr", meta.inner_lr)
        _positive("meta.outer_lr", meta.outer_lr)
        _at_least("meta.num_inner_steps", meta.num_inner_steps, algorithm.min_inner_steps)
        for key in ("meta_batch_size", "inner_batch_size", "query_batch_size"):
            _at_least(f"meta.{key}", getattr(meta, key), 1)
        _at_least("meta.metaicl_demos", meta.metaicl_demos, 0)
        if meta.tasks_per_pass is not None:
            _at_least("meta.tasks_per_pass", meta.tasks_per_pass, 1)
        if meta.task_batching is True:
            reason = task_batching_conflict(self)
            if reason:
                raise ConfigError(f"meta.task_batching=true: {reason}; set it to auto or false")
        if meta.learn_inner_lr != "none":
            if not algorithm.learned_rates:
                which = " and ".join(n for n, c in ALGORITHMS.items() if c.learned_rates)
                raise ConfigError(f"meta.learn_inner_lr={meta.learn_inner_lr}: defined for {which} only, "
                                  f"not {meta.algorithm}")
            if model.use_fsdp:
                raise ConfigError(f"meta.learn_inner_lr={meta.learn_inner_lr}: not supported under FSDP "
                                  "(model.use_fsdp); use the task-parallel strategy")
            _positive("meta.inner_lr_lr", meta.inner_lr_lr)
        from metasft.scope import parse_scope

        scope = parse_scope(meta.inner_scope)
        if scope.kind != "all" and not algorithm.episodic:
            raise ConfigError(f"meta.inner_scope={meta.inner_scope}: {meta.algorithm} has no inner loop; leave it at all")
        if model.train_top_layers is not None:
            _at_least("model.train_top_layers", model.train_top_layers, 1)
            if scope.kind == "top_layers" and scope.layers > model.train_top_layers:
                raise ConfigError(f"meta.inner_scope={meta.inner_scope}: the inner scope must lie within the "
                                  f"meta-parameters (model.train_top_layers={model.train_top_layers})")
        if model.use_fsdp and (scope.kind != "all" or model.train_top_layers is not None):
            raise ConfigError("model.use_fsdp: meta.inner_scope and model.train_top_layers are supported with the "
                              "task-parallel strategy only (model.use_fsdp=false)")
        if meta.inner_optimizer not in algorithm.inner_optimizers:
            which = ", ".join(n for n, c in ALGORITHMS.items() if meta.inner_optimizer in c.inner_optimizers)
            raise ConfigError(f"meta.inner_optimizer={meta.inner_optimizer} is only defined for {which}, "
                              f"not {meta.algorithm}")
        if meta.tasks and meta.tasks_dir:
            raise ConfigError("meta.tasks and meta.tasks_dir are both set; give one")
        names = set()
        for i, task in enumerate(meta.tasks):
            validate_task_name(task.name, f"meta.tasks[{i}].name")
            if task.name in names:
                raise ConfigError(f"meta.tasks[{i}].name: duplicate task name {task.name!r}")
            names.add(task.name)
            for key in ("support_files", "query_files"):
                if not getattr(task, key):
                    raise ConfigError(f"meta.tasks[{i}].{key}: task {task.name!r} needs at least one file")
        _at_least("model.lora_rank", model.lora_rank, 0)
        _positive("model.lora_alpha", model.lora_alpha)
        if not 0 <= model.lora_dropout < 1:
            raise ConfigError(f"model.lora_dropout: {model.lora_dropout} must be in [0, 1)")
        if isinstance(model.target_modules, list) and not model.target_modules:
            raise ConfigError("model.target_modules: empty list; name modules or use 'all-linear'")
        # "all-linear" leaves lm_head out, and names no lm_head either
        if model.lora_full_head and (model.lora_rank <= 0 or "lm_head" not in model.target_modules):
            raise ConfigError("model.lora_full_head: needs LoRA (model.lora_rank > 0) with lm_head in "
                              "model.target_modules")
        if model.use_fsdp and algorithm.second_order:
            raise ConfigError(
                "model.use_fsdp: second-order maml is not supported under FSDP; "
                "use meta.algorithm=fomaml or the task-parallel strategy (model.use_fsdp=false)"
            )
        _at_least("data.max_length", data.max_length, 2)
        _at_least("optim.weight_decay", optim.weight_decay, 0)
        if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
            raise ConfigError(f"optim.betas: {optim.betas} must be two numbers in [0, 1)")
        if optim.clip_grad is not None:
            _positive("optim.clip_grad", optim.clip_grad)
        if not 0 <= optim.warmup_steps_ratio < 1:
            raise ConfigError(f"optim.warmup_steps_ratio: {optim.warmup_steps_ratio} must be in [0, 1)")
        if not 0 <= optim.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio: {optim.min_lr_ratio} must be in [0, 1]")
        _at_least("trainer.total_training_steps", trainer.total_training_steps, 1)
        if trainer.save_freq == 0 or trainer.save_freq < -1:
            raise ConfigError(f"trainer.save_freq: {trainer.save_freq} must be a positive number of steps or -1")
        if trainer.test_exact_match_rows < 0:
            raise ConfigError(f"trainer.test_exact_match_rows: {trainer.test_exact_match_rows} must be >= 0")
        if trainer.test_freq == 0 or trainer.test_freq < -1:
            raise ConfigError(f"trainer.test_freq: {trainer.test_freq} must be a positive number of steps or -1")
        if trainer.keep is not None:
            _at_least("trainer.keep", trainer.keep, 1)
        _at_least("trainer.log_freq", trainer.log_freq, 1)
        if trainer.time_budget_s is not None:
            _positive("trainer.time_budget_s", trainer.time_budget_s)
        if model.enable_gradient_checkpointing and algorithm.second_order:
            raise ConfigError(
                "model.enable_gradient_checkpointing: not supported with second-order maml (recomputation "
                "in backward cannot see the adapted weights, so gradients would be silently wrong); "
                "turn it off or use fomaml/reptile"
            )
        _at_least("trainer.max_nonfinite_steps", trainer.max_nonfinite_steps, 1)
        for name in trainer.logger:
            if name not in LOGGERS:
                raise ConfigError(f"trainer.logger: unknown logger {name!r} (use {', '.join(LOGGERS)})")
        if not (trainer.device in ("auto", "cpu", "cuda") or trainer.device.startswith("cuda:")):
            raise ConfigError(f"trainer.device: {trainer.device!r} is not auto, cpu, cuda or cuda:N")
        if not trainer.resume_mode:
            raise ConfigError("trainer.resume_mode: empty; use auto, disable or a checkpoint path")


def task_batching_conflict(cfg: "Config") -> str | None:
    """Why the tasks of a meta-step cannot adapt in one batched pass under ``cfg`` (None: they can)."""
    from metasft.algorithms import ALGORITHMS

    algorithm = ALGORITHMS[cfg.meta.algorithm or "fomaml"]  # an unvalidated Config() means the default
    if not algorithm.episodic:
        return f"{cfg.meta.algorithm} has no inner loop to batch (its tasks already share one batch per step)"
    if not algorithm.batched():
        return f"{cfg.meta.algorithm} has no task-batched form"
    if cfg.model.use_fsdp:
        return "not supported under FSDP (model.use_fsdp), whose ranks share every task's batch"
    if cfg.model.enable_gradient_checkpointing:
        return ("activation checkpointing recomputes with the module's own weights, not the per-task "
                "weights of a batched pass")
    return None


def validate_task_name(name: str, key: str) -> None:
    """A task name becomes a directory name: refuse anything that could escape the output dir."""
    if not name or not name.strip():
        raise ConfigError(f"{key}: task name is empty")
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith(".") or "\x00" in name:
        raise ConfigError(f"{key}: task name {name!r} must not contain path separators or start with '.'")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: {value} must be > 0")


def _at_least(key: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ConfigError(f"{key}: {value} must be >= {minimum}")


# ----------------------------------------------------------------------------- typed construction

def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in data if key not in fields]
    if unknown:
        import difflib

        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else f" (known: {', '.join(fields)})"
        raise ConfigError(f"{prefix}{key}: unknown config key{hint}")
    values = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    return cls(**values)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[-1] if len(errors) == 1 else ConfigError(f"{key}: {value!r} has the wrong type (expected {_type_name(tp)})")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp} for {key}")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


# ----------------------------------------------------------------------------- loading

def shipped_config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', None) or exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"{override}: overrides are written key=value (e.g. meta.inner_lr=1e-4)")
    key, raw = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"{override}: empty key in override")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:depth + 1])}: is not a section, cannot set {key}")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, name: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated :class:`Config` from a YAML file or a shipped config name, plus overrides."""
    if path is not None and name is not None:
        raise ConfigError("give --config PATH or --config-name NAME, not both")
    data: dict[str, Any] = {}
    if name is not None:
        shipped = CONFIG_DIR / f"{name}.yaml"
        if not shipped.is_file():
            raise ConfigError(f"--config-name {name}: no such shipped config (have: {', '.join(shipped_config_names())})")
        data = load_yaml(shipped)
    elif path is not None:
        data = load_yaml(path)
    for override in overrides:
        apply_override(data, override)
    return Config.from_dict(data)


def schema_reference() -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) for every key of the schema, in declaration order."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((f"{prefix}{f.name}", _type_name(tp), json.dumps(default), f.metadata.get("help", "")))

    walk(Config, "")
    return rows


def reference_markdown() -> str:
    """docs/configuration.md: every key of the schema with its type, default and help text.
    Generated (``metasft configs --reference``) and checked by a test, so it cannot drift."""
    lines = ["# Configuration reference", "",
             "Generated from the typed schema in `metasft/config.py` by `metasft configs --reference`; "
             "a test fails when this file is out of date.", "",
             "Set keys in a YAML file (`--config PATH`), pick a shipped config (`--config-name NAME`: "
             + ", ".join(f"`{n}`" for n in shipped_config_names()) + "), and override any key on the command line "
             "with `section.key=value` (values are parsed as YAML).", ""]
    section = None
    for key, type_name, default, help_text in schema_reference():
        top = key.split(".")[0]
        if top != section:
            section = top
            lines += ["", f"## `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        cells = [f"`{key}`", f"`{type_name}`", f"`{default}`", help_text]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
