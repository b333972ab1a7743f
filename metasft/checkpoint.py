"""Checkpoints (SPEC §5): ``<run_dir>/step_<N>/``, directly loadable and exactly resumable.

A checkpoint directory holds

* the model: ``save_pretrained`` safetensors (full weights: ``AutoModelForCausalLM.from_pretrained``;
  LoRA: the peft adapter, ``AutoPeftModelForCausalLM.from_pretrained``), and the tokenizer;
* ``metasft_config.yaml``: the resolved run config;
* ``trainer_state.json``: step, batch-schedule positions, counters (plain JSON);
* ``optimizer.pt``: outer-optimizer state and RNG states, read back with ``weights_only=True``;
* ``inner_lrs.safetensors`` (with ``meta.learn_inner_lr``): the learned inner rates, keyed by
  meta-parameter name (a scalar per tensor, or one value per inner step).

It is written under a temporary name and renamed into place when complete, so a crash at any
moment leaves either the previous checkpoint set or the new one, never a partial one that
``resume_mode=auto`` would pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from metasft import faults
from metasft.data.io import temporary_dir
from metasft.errors import MetasftError
from metasft.model import quiet_peft

STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "metasft_config.yaml"
INNER_LRS_FILE = "inner_lrs.safetensors"


def step_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    dirs = step_dirs(run_dir)
    return dirs[-1][1] if dirs else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | os.PathLike, step: int, model, tokenizer, config_yaml: str,
                    optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any], keep: int | None = None,
                    model_state: dict | None = None, optimizer_state: dict | None = None,
                    inner_lrs: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``run_dir/step_<step>`` atomically and prune to the newest ``keep``.

    ``model_state`` / ``optimizer_state`` are full (gathered) state dicts under FSDP; by default
    the model's and optimizer's own."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step_{step}"
    tmp = temporary_dir(run_dir, f".step_{step}.tmp-")
    try:
        faults.point("checkpoint.before_weights", step)
        with quiet_peft():
            if model_state is None:
                model.save_pretrained(tmp, safe_serialization=True)
            else:
                model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
        faults.point("checkpoint.while_weights", step, tear=lambda: next(tmp.glob("*.safetensors")))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
        if inner_lrs is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().float().contiguous().cpu() for k, v in inner_lrs.items()}, tmp / INNER_LRS_FILE)
        faults.point("checkpoint.after_weights", step)
        torch.save({"optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state, "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / OPTIMIZER_FILE)
        faults.point("checkpoint.while_optimizer", step, tear=tmp / OPTIMIZER_FILE)
        faults.point("checkpoint.after_optimizer", step)
        # The state file is written last: a directory without it is never treated as complete.
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as handle:
            json.dump({"step": step, **trainer_state}, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        faults.point("checkpoint.while_trainer_state", step, tear=tmp / STATE_FILE)
        _fsync_dir(tmp)
        faults.point("checkpoint.before_rename", step)
        if final.exists():
            # Re-saving a step (after a resume): move the old one aside first so that some complete
            # copy exists at every moment.
            old = run_dir / f".step_{step}.old-{os.getpid()}"
            os.replace(final, old)
            faults.point("checkpoint.while_replacing", step)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(run_dir)
        faults.point("checkpoint.after_rename", step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for _, path in step_dirs(run_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def recover_run_dir(run_dir: str | os.PathLike) -> None:
    """Tidy what a crash during :func:`save_checkpoint` can leave in ``run_dir``: a half-written
    ``.step_N.tmp-*`` directory is deleted, and a complete old copy moved aside while re-saving
    ``step_N`` (``.step_N.old-*``) is put back when ``step_N`` itself never arrived. Call it only
    while no other process writes to ``run_dir`` (before training, on the main rank)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for child in sorted(run_dir.iterdir()):
        match = re.match(r"^\.(step_\d+)\.(tmp|old)-", child.name)
        if not match:
            continue
        final = run_dir / match.group(1)
        if match.group(2) == "old" and not final.exists() and (child / STATE_FILE).is_file():
            os.replace(child, final)
        else:
            shutil.rmtree(child, ignore_errors=True)


def read_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise MetasftError(f"{checkpoint}: not a complete metasft checkpoint (no {STATE_FILE})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MetasftError(f"{path}: unreadable trainer state ({exc.msg})") from exc


def read_model_weights(checkpoint: str | os.PathLike, lora: bool) -> dict[str, torch.Tensor]:
    """A checkpoint's weights keyed like ``model.state_dict()`` of the training model (for FSDP's
    full-state-dict loading): peft drops the adapter name from saved keys; put it back."""
    checkpoint = Path(checkpoint)
    if lora:
        state = load_file(checkpoint / "adapter_model.safetensors")
        return {re.sub(r"\.(lora_[AB])\.", r".\1.default.", k): v for k, v in state.items()}
    state: dict[str, torch.Tensor] = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        if not file.name.startswith("adapter_") and file.name != INNER_LRS_FILE:
            state.update(load_file(file))
    if not state:
        raise MetasftError(f"{checkpoint}: no model safetensors (is this a full-weight checkpoint?)")
    return state


def read_inner_lrs(checkpoint: str | os.PathLike, required: bool = False) -> dict[str, torch.Tensor] | None:
    """A checkpoint's learned inner rates by meta-parameter name (None when it has none)."""
    path = Path(checkpoint) / INNER_LRS_FILE
    if not path.is_file():
        if required:
            raise MetasftError(f"{checkpoint}: no {INNER_LRS_FILE}, but the run learns inner rates "
                               "(meta.learn_inner_lr); resume it with the settings it was made with")
        return None
    try:
        return load_file(path)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file
        raise MetasftError(f"{path}: unreadable ({exc})") from exc


def load_model_weights(model, checkpoint: str | os.PathLike, lora: bool) -> None:
    """Load a checkpoint's weights into ``model`` in place (exact fp32 values, for resume)."""
    checkpoint = Path(checkpoint)
    if lora:
        from peft import set_peft_model_state_dict

        file = checkpoint / "adapter_model.safetensors"
        if not file.is_file():
            raise MetasftError(f"{checkpoint}: no adapter_model.safetensors (is this a LoRA checkpoint?)")
        state = load_file(file)
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        result = set_peft_model_state_dict(model, state)
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if len(state) == 0 or missing:
            raise MetasftError(f"{checkpoint}: adapter does not match the model (missing {missing[:1] or expected})")
        return
    state = read_model_weights(checkpoint, lora=False)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise MetasftError(f"{checkpoint}: weights do not fit this model ({first[1].strip() if len(first) > 1 else first[0]})") from exc
    loaded = {p.data_ptr() for n, p in model.named_parameters() if n in state}
    real_missing = [k for k in missing if not _is_tied_to_loaded(model, k, loaded)]
    if unexpected or real_missing:
        what = f"unexpected {unexpected[0]}" if unexpected else f"missing {real_missing[0]}"
        raise MetasftError(f"{checkpoint}: weights do not fit this model ({what})")


def _is_tied_to_loaded(model, key: str, loaded_ptrs: set[int]) -> bool:
    try:
        tensor = model.get_parameter(key)
    except AttributeError:
        try:
            tensor = model.get_buffer(key)
        except AttributeError:
            return False
        return True  # non-persistent buffers (e.g. rotary inv_freq) are rebuilt by the model
    return tensor.data_ptr() in loaded_ptrs


def load_optimizer_state(checkpoint: str | os.PathLike, optimizer: torch.optim.Optimizer | None):
    """Restore the optimizer state and RNG states; with ``optimizer=None`` return the saved
    optimizer state instead (FSDP loads it through its own API)."""
    path = Path(checkpoint) / OPTIMIZER_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise MetasftError(f"{path}: cannot read optimizer state ({exc})") from exc
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if optimizer is None:
        return state["optimizer"]
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as exc:
        raise MetasftError(f"{path}: optimizer state does not match this run ({exc})") from exc
    return None


def load_pretrained(path: str | os.PathLike, key: str = "--checkpoint"):
    """Load a model directory for adaptation or evaluation: a metasft checkpoint (full or LoRA),
    or any ``save_pretrained`` directory / hub id (the un-meta-trained base model).

    Returns ``(model, tokenizer, config_or_None)``; LoRA checkpoints come back as a trainable
    ``PeftModel`` over their base model, so adapting one adapts only the adapter.
    """
    from metasft.config import Config, ModelConfig, load_yaml
    from metasft.model import load_model, load_tokenizer

    path = Path(path)
    if not path.exists():
        raise MetasftError(f"{key} {path}: no such checkpoint directory")
    saved_cfg = None
    if (path / CONFIG_FILE).is_file():
        saved_cfg = Config.from_dict(load_yaml(path / CONFIG_FILE))
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            with quiet_peft():
                model = AutoPeftModelForCausalLM.from_pretrained(str(path), is_trainable=True)
        except (OSError, ValueError) as exc:
            raise MetasftError(f"{key} {path}: cannot load the LoRA adapter or its base model ({str(exc).splitlines()[0]})") from exc
    else:
        if path.is_dir() and not (path / "config.json").is_file():
            raise MetasftError(f"{key} {path}: not a model directory (no config.json or adapter_config.json)")
        model = load_model(ModelConfig(partial_pretrain=str(path)))
        for param in model.parameters():
            param.requires_grad_(True)
    try:
        tokenizer = load_tokenizer(ModelConfig(partial_pretrain=str(path)))
    except MetasftError:
        if saved_cfg is None or not saved_cfg.model.partial_pretrain:
            raise
        tokenizer = load_tokenizer(saved_cfg.model)
    return model, tokenizer, saved_cfg
