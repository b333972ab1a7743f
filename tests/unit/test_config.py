"""Configuration: schema, overrides, shipped configs, and errors that name the key."""

import pytest

from metasft.config import Config, load_config, schema_reference, shipped_config_names
from metasft.errors import ConfigError


@pytest.mark.parametrize("name", shipped_config_names())
def test_every_shipped_config_loads_and_validates(name):
    cfg = load_config(name=name)
    assert cfg.meta.algorithm in ("maml", "fomaml", "reptile", "sft", "metaicl")


def test_shipped_configs_include_the_seed_names():
    assert {"fomaml", "maml", "reptile", "meta_lora", "sft", "config_maml_sft_example",
            "config_meta_lora_example"} <= set(shipped_config_names())


def test_every_shipped_config_opens_with_its_command():
    from metasft.config import CONFIG_DIR

    for name in shipped_config_names():
        first = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith(f"# metasft train --config-name {name}")


def test_overrides_are_typed(tmp_path):
    cfg = load_config(name="fomaml", overrides=["meta.inner_lr=1e-3", "meta.num_inner_steps=2",
                                                 "optim.clip_grad=null", "trainer.logger=[jsonl]"])
    assert cfg.meta.inner_lr == 1e-3 and cfg.meta.num_inner_steps == 2
    assert cfg.optim.clip_grad is None and cfg.trainer.logger == ["jsonl"]


def test_yaml_file_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("meta:\n  algorithm: reptile\n  tasks_dir: d\n")
    cfg = load_config(path=path)
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_seed_use_fomaml_selects_algorithm():
    assert load_config(overrides=["meta.use_fomaml=true"]).meta.algorithm == "fomaml"
    assert load_config(overrides=["meta.use_fomaml=false"]).meta.algorithm == "maml"


@pytest.mark.parametrize("override,message", [
    ("meta.innerlr=1", r"meta.innerlr: unknown config key; did you mean meta.inner_lr\?"),
    ("modle.lora_rank=1", "modle: unknown config key"),
    ("meta.inner_lr=fast", "meta.inner_lr: expected a number"),
    ("meta.num_inner_steps=1.5", "meta.num_inner_steps: expected an integer"),
    ("meta.inner_lr=-1", r"meta.inner_lr: -1.0 must be > 0"),
    ("meta.outer_lr=0", "meta.outer_lr: 0.0 must be > 0"),
    ("meta.meta_batch_size=0", "meta.meta_batch_size: 0 must be >= 1"),
    ("meta.algorithm=mamal", "meta.algorithm: 'mamal' is not one of"),
    ("data.truncation=middle", "data.truncation"),
    ("trainer.logger=[stdout]", "trainer.logger: unknown logger 'stdout'"),
    ("model.use_fsdp=maybe", "model.use_fsdp: expected true or false"),
    ("meta.tasks=[{name: a/b, support_files: [x], query_files: [y]}]", "meta.tasks\\[0\\].name"),
    ("noequals", "overrides are written key=value"),
    ("model.lora_full_head=true", "model.lora_full_head: needs LoRA"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_a_full_head_adapter_needs_lm_head_among_the_targets():
    lora = ["model.lora_rank=4", "model.lora_full_head=true"]
    with pytest.raises(ConfigError, match="model.lora_full_head: needs LoRA"):
        load_config(overrides=lora + ["model.target_modules=[q_proj]"])
    assert load_config(overrides=lora + ["model.target_modules=[q_proj, lm_head]"]).model.lora_full_head


def test_contradictions_are_refused():
    with pytest.raises(ConfigError, match="meta.use_fomaml=true contradicts meta.algorithm=maml"):
        load_config(overrides=["meta.use_fomaml=true", "meta.algorithm=maml"])
    with pytest.raises(ConfigError, match="model.use_fsdp: second-order maml is not supported"):
        load_config(overrides=["meta.algorithm=maml", "model.use_fsdp=true"])
    with pytest.raises(ConfigError, match="both set"):
        load_config(overrides=["meta.tasks_dir=x", "meta.tasks=[{name: a, support_files: [x], query_files: [y]}]"])


@pytest.mark.parametrize("overrides,message", [
    (["meta.algorithm=reptile", "meta.learn_inner_lr=per_tensor"], "defined for maml and fomaml only, not reptile"),
    (["meta.algorithm=sft", "meta.learn_inner_lr=per_tensor"], "defined for maml and fomaml only, not sft"),
    (["meta.algorithm=fomaml", "meta.learn_inner_lr=per_tensor", "model.use_fsdp=true"], "not supported under FSDP"),
    (["meta.algorithm=fomaml", "meta.learn_inner_lr=per_tensor", "meta.inner_lr_lr=0"], "meta.inner_lr_lr: 0.0 must be > 0"),
    (["meta.learn_inner_lr=per_layer"], "meta.learn_inner_lr: 'per_layer' is not one of"),
    (["meta.algorithm=metaicl", "meta.metaicl_demos=-1"], "meta.metaicl_demos: -1 must be >= 0"),
    (["meta.metaicl_loss=some"], "meta.metaicl_loss: 'some' is not one of"),
])
def test_learned_rates_and_metaicl_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_unknown_shipped_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="no such shipped config.*fomaml"):
        load_config(name="nope")


def test_schema_reference_has_help_for_every_key():
    rows = schema_reference()
    assert len(rows) > 40
    assert all(help_text for _, _, _, help_text in rows)


def test_configuration_reference_in_docs_is_current():
    from pathlib import Path

    from metasft.config import reference_markdown

    path = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert path.read_text() == reference_markdown(), "regenerate: metasft configs --reference > docs/configuration.md"


@pytest.mark.parametrize("overrides,message", [
    (["meta.algorithm=sft"], "sft has no inner loop"),
    (["meta.algorithm=fomaml", "model.use_fsdp=true"], "not supported under FSDP"),
    (["meta.algorithm=fomaml", "model.enable_gradient_checkpointing=true"], "activation checkpointing"),
])
def test_explicit_task_batching_refuses_what_it_cannot_batch(overrides, message):
    with pytest.raises(ConfigError, match=rf"meta.task_batching=true: .*{message}"):
        load_config(overrides=["meta.task_batching=true", *overrides])


@pytest.mark.parametrize("overrides,expected", [
    ([], 4),                                               # auto: the whole meta-batch in one pass
    (["meta.tasks_per_pass=3"], 3),
    (["meta.task_batching=false"], 1),
    (["meta.task_batching=true", "meta.meta_batch_size=6"], 6),
    (["meta.algorithm=sft"], 1),                           # auto falls back where batching cannot apply
    (["model.use_fsdp=true"], 1),
    (["model.enable_gradient_checkpointing=true"], 1),
    (["meta.meta_batch_size=1"], 1),                       # nothing to batch
])
def test_auto_task_batching_resolution(overrides, expected):
    from metasft.train import resolve_tasks_per_pass

    per_pass, reason = resolve_tasks_per_pass(load_config(overrides=["meta.meta_batch_size=4", *overrides]),
                                              num_model_params=1_000_000)
    assert per_pass == expected
    assert bool(reason) == (expected == 1)


def test_task_batching_values_are_checked():
    with pytest.raises(ConfigError, match="meta.task_batching"):
        load_config(overrides=["meta.task_batching=sometimes"])
    with pytest.raises(ConfigError, match="meta.tasks_per_pass: 0 must be >= 1"):
        load_config(overrides=["meta.tasks_per_pass=0"])


@pytest.mark.parametrize("overrides,expected", [
    ([], 1),                                   # auto, full weights of a large model: measured slower
    (["meta.task_batching=true"], 4),          # forced
    (["model.lora_rank=8"], 1),                # LoRA: no faster, 3.5x the memory on SmolLM2
    (["model.lora_rank=8", "meta.task_batching=true"], 4),
])
def test_auto_does_not_batch_tasks_on_a_large_model(overrides, expected):
    from metasft.train import AUTO_BATCHING_MAX_MODEL_PARAMS, resolve_tasks_per_pass

    cfg = load_config(overrides=["meta.meta_batch_size=4", *overrides])
    per_pass, reason = resolve_tasks_per_pass(cfg, num_model_params=AUTO_BATCHING_MAX_MODEL_PARAMS + 1)
    assert per_pass == expected
    assert (expected == 1) == ("measured slower" in reason)
    small, _ = resolve_tasks_per_pass(cfg, num_model_params=AUTO_BATCHING_MAX_MODEL_PARAMS)
    assert small == 4
    # Tasks that run by rows (MAML over the head adapter on cached layers) batch on any model.
    by_rows, _ = resolve_tasks_per_pass(cfg, num_model_params=AUTO_BATCHING_MAX_MODEL_PARAMS + 1, tasks_by_rows=True)
    assert by_rows == 4


def test_validation_reads_what_an_algorithm_declares(monkeypatch):
    """A new algorithm is a class plus one registry entry: one that declares no task-batched form gets
    task batching refused up front (not at its first meta-step), and its other declarations are honoured."""
    from metasft.algorithms import ALGORITHMS, MetaAlgorithm
    from metasft.config import task_batching_conflict

    class Plain(MetaAlgorithm):
        name = "plain"
        min_inner_steps = 2
        batches_tasks = False

    monkeypatch.setitem(ALGORITHMS, "plain", Plain)
    cfg = Config.from_dict({"meta": {"algorithm": "plain", "num_inner_steps": 2}})
    assert "no task-batched form" in task_batching_conflict(cfg)
    with pytest.raises(ConfigError, match="meta.task_batching=true: plain has no task-batched form"):
        Config.from_dict({"meta": {"algorithm": "plain", "num_inner_steps": 2, "task_batching": True}})
    with pytest.raises(ConfigError, match="meta.num_inner_steps: 1 must be >= 2"):
        Config.from_dict({"meta": {"algorithm": "plain", "num_inner_steps": 1}})
    with pytest.raises(ConfigError, match="meta.learn_inner_lr=per_tensor: defined for maml and fomaml only, not plain"):
        Config.from_dict({"meta": {"algorithm": "plain", "num_inner_steps": 2, "learn_inner_lr": "per_tensor"}})


@pytest.mark.parametrize("overrides,message", [
    ({"meta": {"algorithm": "sft", "inner_scope": "head"}}, "sft has no inner loop"),
    ({"meta": {"inner_scope": "top"}}, "meta.inner_scope: 'top' is not all, head or top_layers:N"),
    ({"meta": {"inner_scope": "top_layers:0"}}, "is not all, head or top_layers:N"),
    ({"meta": {"inner_scope": "top_layers:3"}, "model": {"train_top_layers": 2}}, "must lie within the meta-parameters"),
    ({"model": {"train_top_layers": 0}}, "model.train_top_layers: 0 must be >= 1"),
    ({"meta": {"inner_scope": "head"}, "model": {"use_fsdp": True}}, "task-parallel strategy only"),
])
def test_scope_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(overrides)
