"""Load the user's tokenizer and causal LM, optionally wrapped with LoRA adapters.

This is the one place that talks to ``transformers.Auto*`` and ``peft``, so the rest of metasft
deals only with an ``nn.Module`` and a list of trainable ``(name, parameter)`` pairs -- the
meta-parameters θ. Under full fine-tuning θ is every weight; under LoRA (META-LoRA) θ is only the
adapter weights and the base model stays frozen.

``model_cfg`` is the ``model`` section of the run config. It is used by attribute access only
(``partial_pretrain``, ``tokenizer_path``, ``trust_remote_code``, ``attn_implementation``,
``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``target_modules``,
``enable_gradient_checkpointing``), so tests can pass a ``types.SimpleNamespace``.

Loading failures the user can fix (a wrong path, a directory that is not a checkpoint, an
unavailable attention kernel, LoRA target modules that do not exist) become one-line
:class:`~metasft.errors.MetasftError` messages naming the config key.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

from metasft.errors import MetasftError

_REASON_MAX_CHARS = 200


def _short_reason(exc: BaseException) -> str:
    """First non-empty line of an exception message, truncated: HF errors are often paragraphs."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line:
            if len(line) > _REASON_MAX_CHARS:
                line = line[: _REASON_MAX_CHARS - 3] + "..."
            return line
    return type(exc).__name__


def _looks_local(path: str) -> bool:
    """Whether ``path`` is meant as a local directory rather than a Hub id like ``org/name``.

    A missing local path must fail fast with a clear message; handing it to ``from_pretrained``
    instead gives a confusing "Repo id must be in the form ..." error (or, for a bare name, slow
    network retries). Local: absolute, ``./``-, ``../``- or ``~``-relative, more than one ``/``
    (Hub ids have at most one), a backslash, or a first component that exists here (``runs/x``).
    """
    if path.startswith(("/", ".", "~")) or os.path.isabs(path) or "\\" in path:
        return True
    if path.count("/") > 1:
        return True
    first = path.split("/", 1)[0]
    return "/" in path and os.path.exists(first)


def _resolve(path: str, key: str, what: str) -> str:
    """Expand ``~`` and check that a local-looking path exists; Hub ids pass through unchanged."""
    if not _looks_local(path):
        return path
    resolved = os.path.expanduser(path)
    if not os.path.exists(resolved):
        raise MetasftError(f"{key}: cannot load {what} from {path!r}: no such file or directory")
    return resolved


def load_tokenizer(model_cfg):
    """Load the tokenizer from ``tokenizer_path`` (default: ``partial_pretrain``).

    A tokenizer without a pad token gets ``pad_token = eos_token`` (Llama-style checkpoints ship
    none); padding positions are masked out of the loss anyway, so reusing EOS is harmless.
    """
    from transformers import AutoTokenizer

    tokenizer_path = getattr(model_cfg, "tokenizer_path", None)
    # Name the key the user actually set, so the message points at the right line of the config.
    key = "model.tokenizer_path" if tokenizer_path else "model.partial_pretrain"
    path = tokenizer_path or model_cfg.partial_pretrain
    resolved = _resolve(path, key, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolved, trust_remote_code=bool(getattr(model_cfg, "trust_remote_code", False))
        )
    except (OSError, ValueError) as exc:
        # OSError: missing files / Hub unreachable; ValueError: a directory with no tokenizer files.
        raise MetasftError(f"{key}: cannot load tokenizer from {path!r}: {_short_reason(exc)}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dtype_kwarg() -> str:
    """``from_pretrained`` takes ``dtype`` since transformers 4.56 (``torch_dtype`` before).

    A version check rather than try/except: ``from_pretrained`` accepts ``**kwargs``, and older
    releases silently forward an unknown ``dtype=`` to the config instead of raising, which would
    load the model in the wrong precision without any error.
    """
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def load_model(model_cfg, dtype: torch.dtype = torch.float32):
    """Load ``partial_pretrain`` as a causal LM, then apply LoRA and activation checkpointing.

    Returns a ``PeftModel`` when ``lora_rank > 0``, else the plain ``PreTrainedModel``. The model
    comes back in eval mode, as ``from_pretrained`` leaves it; the trainer switches modes.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # metasft's own progress display is the one to read
    path = model_cfg.partial_pretrain
    resolved = _resolve(path, "model.partial_pretrain", "model")
    attn_implementation = getattr(model_cfg, "attn_implementation", None)
    kwargs = {
        _dtype_kwarg(): dtype,
        "trust_remote_code": bool(getattr(model_cfg, "trust_remote_code", False)),
    }
    if attn_implementation is not None:
        # Only when set: passing None explicitly is not the same as "library default" in every
        # transformers release.
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        reason = _short_reason(exc)
        # An unknown or uninstalled attention kernel (e.g. flash_attention_2 without flash-attn)
        # is a problem with attn_implementation, not with the checkpoint path.
        if attn_implementation is not None and (
            isinstance(exc, ImportError) or "attn_implementation" in str(exc)
        ):
            raise MetasftError(
                f"model.attn_implementation: cannot load {path!r} with {attn_implementation!r}: {reason}"
            ) from exc
        raise MetasftError(f"model.partial_pretrain: cannot load model from {path!r}: {reason}") from exc

    if getattr(model_cfg, "enable_gradient_checkpointing", False):
        # Enabled on the base model before LoRA wrapping, as peft's own recipes do. Non-reentrant
        # checkpointing works when the inputs to the checkpointed blocks do not require grad (the
        # case under LoRA, with frozen embeddings), so no enable_input_require_grads() hack is needed.
        _enable_checkpointing(model)
    if int(getattr(model_cfg, "lora_rank", 0) or 0) > 0:
        model = apply_lora(model, model_cfg)
    return model


def _enable_checkpointing(model) -> None:
    """Turn on non-reentrant activation checkpointing under either transformers API name.

    transformers 5.x renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    and made the old name warn; older releases only have the old name.
    """
    ckpt_kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)


@contextlib.contextmanager
def quiet_peft():
    """Leave out peft's warnings that the user cannot act on, around building, loading or saving an
    adapter; every other warning still shows."""
    with warnings.catch_warnings():
        # peft 0.21 reads the `is_gradient_checkpointing` property that transformers 5 deprecated.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # An adapter on a head tied to the input embeddings adapts the head alone, on purpose: the
        # embeddings (and so every frozen, cached layer) stay the base's. peft's advice, to tie the
        # adapter too, would adapt the embeddings as well.
        warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*", category=UserWarning)
        # Saving such an adapter saves the tied matrix with it, as it must; peft says it does.
        warnings.filterwarnings("ignore", message=".*save_embedding_layers.*", category=UserWarning)
        yield


def apply_lora(model, model_cfg):
    """Wrap ``model`` with LoRA adapters; peft freezes every base weight.

    ``target_modules`` is a list of module names, or peft's ``"all-linear"`` keyword (every linear
    layer except the output head).
    """
    from peft import LoraConfig, get_peft_model

    target_modules = model_cfg.target_modules
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    full_head = bool(getattr(model_cfg, "lora_full_head", False))
    # A full head adapter: rank = alpha = hidden size (scale 1); lora_A is set to the identity below.
    hidden = model.get_output_embeddings().in_features if full_head else 0
    lora_config = LoraConfig(
        r=int(model_cfg.lora_rank),
        lora_alpha=model_cfg.lora_alpha,
        lora_dropout=float(model_cfg.lora_dropout),
        target_modules=target_modules,
        rank_pattern={"lm_head": hidden} if full_head else {},
        alpha_pattern={"lm_head": hidden} if full_head else {},
        task_type="CAUSAL_LM",
    )
    try:
        with quiet_peft():
            peft_model = get_peft_model(model, lora_config)
    except ValueError as exc:
        # e.g. "Target modules {'q'} not found in the base model."
        raise MetasftError(f"model.target_modules: {_short_reason(exc)}") from exc
    if full_head:
        head = peft_model.get_output_embeddings()
        with torch.no_grad():
            head.lora_A["default"].weight.copy_(torch.eye(hidden, dtype=head.lora_A["default"].weight.dtype))
    return peft_model


def is_peft_model(model) -> bool:
    """Whether ``model`` is a peft ``PeftModel`` (i.e. LoRA is on)."""
    # If peft was never imported, nothing can be a PeftModel; avoids importing peft just to check.
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def trainable_named_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The meta-parameters θ: every ``(name, param)`` with ``requires_grad``, tied tensors once.

    Full fine-tuning: all weights. LoRA: only the ``lora_A``/``lora_B`` adapter weights. A tied
    embedding/LM-head tensor appears once (under its first name), so updating θ never updates the
    same storage twice.
    """
    seen: set[int] = set()
    out: list[tuple[str, torch.nn.Parameter]] = []
    # remove_duplicate=False + our own id() check keeps this correct even for modules that
    # override named_parameters without deduplication.
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        if param.requires_grad:
            out.append((name, param))
    return out


def count_parameters(model) -> tuple[int, int]:
    """``(total, trainable)`` parameter counts, counting tied tensors once."""
    seen: set[int] = set()
    total = trainable = 0
    for _, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return total, trainable
