"""Which parameters the inner loop adapts and which the outer loop trains, and running part of the
decoder stack so that the layers below both are computed once.

    meta.inner_scope: all | head | top_layers:N     what the inner loop adapts (⊆ the meta-parameters)
    model.train_top_layers: N                        restricts the meta-parameters to the top N layers

Both are sets of parameters read from the decoder's structure (STYLE.md: "scope is what you hand the
engine"): ``head`` is the output projection (its LoRA adapter under LoRA), ``top_layers:N`` the last
N decoder layers, the final norm and the head. ANIL (Raghu et al., ICLR 2020) is MAML or FOMAML with
``inner_scope: head``.

Layers below the inner scope do not change during the inner loop, so their hidden states are
computed once per batch and every inner step runs only the layers above (:class:`LayerWindow`).
Layers below the meta-parameters never change at all, so their hidden states are computed once per
row for the whole run (:class:`PrefixCache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from metasft.errors import ConfigError, MetasftError

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Scope:
    kind: str = "all"       # all | head | top_layers
    layers: int = 0         # N of top_layers:N

    def __str__(self) -> str:
        return f"top_layers:{self.layers}" if self.kind == "top_layers" else self.kind


ALL = Scope()


def parse_scope(text: str, key: str = "meta.inner_scope") -> Scope:
    """``all``, ``head`` or ``top_layers:N`` (N ≥ 1); anything else is a one-line ConfigError."""
    text = str(text).strip()
    if text in ("all", "head"):
        return Scope(text)
    match = re.fullmatch(r"top_layers:(\d+)", text)
    if match and int(match.group(1)) >= 1:
        return Scope("top_layers", int(match.group(1)))
    raise ConfigError(f"{key}: {text!r} is not all, head or top_layers:N (N >= 1)")


@dataclass
class DecoderParts:
    """The pieces of a Hugging Face causal LM that scopes are made of."""

    decoder: torch.nn.Module            # the bare decoder (``LlamaModel``): embeddings, layers, norm
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    head: torch.nn.Module               # the output projection (peft's LoRA wrapper of it under LoRA)
    tied: bool                          # head weight is the input embedding's

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def decoder_parts(model) -> DecoderParts:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(layers, torch.nn.ModuleList) or norm is None or head is None:
        raise MetasftError(f"{type(base).__name__}: no decoder.layers / decoder.norm / output head found; "
                           "meta.inner_scope and model.train_top_layers need a Llama-style decoder")
    head_weight = getattr(head, "base_layer", head).weight
    embed = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    tied = embed is not None and embed.weight is head_weight
    return DecoderParts(decoder, layers, norm, head, tied)


def scope_modules(parts: DecoderParts, scope: Scope) -> list[torch.nn.Module] | None:
    """The modules whose parameters make up ``scope`` (None: every module)."""
    if scope.kind == "all":
        return None
    if scope.kind == "head":
        return [parts.head]
    if scope.layers > parts.num_layers:
        raise ConfigError(f"top_layers:{scope.layers}: the model has only {parts.num_layers} decoder layers")
    return [*parts.layers[parts.num_layers - scope.layers:], parts.norm, parts.head]


def first_layer(parts: DecoderParts, scope: Scope) -> int:
    """The lowest decoder layer that ``scope`` touches (``num_layers`` for the head alone)."""
    if scope.kind == "all":
        return 0
    return parts.num_layers if scope.kind == "head" else parts.num_layers - scope.layers


def _in_modules(named_params, modules) -> list[bool]:
    ids = {id(p) for m in modules for p in m.parameters()}
    return [id(p) in ids for _, p in named_params]


def _refuse_tied(parts: DecoderParts, named_params, chosen: list[bool], key: str, value: str) -> None:
    """Full-weight scopes that hold the head of a tied model would also move the input embeddings,
    i.e. change what every layer below sees (and what a cached prefix holds): refused."""
    head_weight = getattr(parts.head, "base_layer", parts.head).weight
    if parts.tied and any(c and p is head_weight for c, (_, p) in zip(chosen, named_params)):
        raise MetasftError(f"{key}={value}: the model ties its output head to its input embeddings "
                           "(tie_word_embeddings), so adapting the head would change every layer's input; use "
                           "LoRA (model.lora_rank > 0 with lm_head in model.target_modules) or an untied model")


def restrict_trainable(model, top_layers: int) -> None:
    """``model.train_top_layers``: freeze every parameter outside the top ``top_layers`` layers, the
    final norm and the head (under LoRA: every adapter outside them)."""
    parts = decoder_parts(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    keep = _in_modules(named, scope_modules(parts, Scope("top_layers", top_layers)))
    _refuse_tied(parts, named, keep, "model.train_top_layers", str(top_layers))
    for (_, param), kept in zip(named, keep):
        if not kept:
            param.requires_grad_(False)
    if not any(keep):
        raise MetasftError(f"model.train_top_layers={top_layers}: no trainable parameter left in the top layers")


def inner_indices(model, named_params, scope: Scope) -> list[int]:
    """Indices into ``named_params`` (the meta-parameters) of those ``scope`` adapts."""
    if scope.kind == "all":
        return list(range(len(named_params)))
    parts = decoder_parts(model)
    chosen = _in_modules(named_params, scope_modules(parts, scope))
    _refuse_tied(parts, named_params, chosen, "meta.inner_scope", str(scope))
    if not any(chosen):
        hint = " (add lm_head to model.target_modules)" if scope.kind == "head" else ""
        raise MetasftError(f"meta.inner_scope={scope}: none of the meta-parameters lies in that scope{hint}")
    return [i for i, c in enumerate(chosen) if c]


def frozen_below(parts: DecoderParts, named_params) -> int:
    """The number of bottom decoder layers (embeddings included) holding no meta-parameter: their
    output is a fixed function of the input row for the whole run. 0 when the embeddings train."""
    trainable = {id(p) for _, p in named_params}
    embed = parts.decoder.get_input_embeddings()
    if any(id(p) in trainable for p in embed.parameters()):
        return 0
    for index, layer in enumerate(parts.layers):
        if any(id(p) in trainable for p in layer.parameters()):
            return index
    return parts.num_layers


class _Skip(torch.nn.Module):
    """Stands in for a decoder layer that is not run: hands the hidden states through."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class LayerWindow:
    """Runs decoder layers ``[start, stop)`` of a model: the others are swapped for pass-throughs
    while it runs, so the model's own forward (positions, masks, rotary embeddings) does the rest.

    * :meth:`hidden` — hidden states entering layer ``stop``, from ``input_ids`` (start 0) or from
      the hidden states entering ``start``;
    * :meth:`suffix` — a context in which the model's forward, given ``inputs_embeds`` = the hidden
      states entering ``start``, runs only layers ``start..`` and the head.
    """

    def __init__(self, model):
        self.model = model
        self.parts = decoder_parts(model)
        self._skip = _Skip()
        self._identity = torch.nn.Identity()

    @contextlib.contextmanager
    def _only(self, start: int, stop: int, norm: bool):
        layers = self.parts.layers
        saved = list(layers)
        decoder = self.parts.decoder
        saved_norm = decoder.norm
        try:
            for i in range(len(saved)):
                if not start <= i < stop:
                    layers[i] = self._skip
            if not norm:
                decoder.norm = self._identity
            yield
        finally:
            for i, layer in enumerate(saved):
                layers[i] = layer
            decoder.norm = saved_norm

    def hidden(self, batch: Batch, start: int, stop: int, inputs: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"attention_mask": batch.get("attention_mask"), "position_ids": batch.get("position_ids"),
                  "use_cache": False}
        with self._only(start, stop, norm=False):
            if start == 0:
                return self.parts.decoder(input_ids=batch["input_ids"], **kwargs).last_hidden_state
            return self.parts.decoder(inputs_embeds=inputs, **kwargs).last_hidden_state

    def suffix(self, start: int):
        return self._only(start, self.parts.num_layers, norm=True) if start > 0 else contextlib.nullcontext()


class PrefixCache:
    """Hidden states entering decoder layer ``cut``, one tensor per distinct row, kept for the run.

    Valid only while nothing below ``cut`` changes (``model.train_top_layers`` with the embeddings
    frozen). Rows are keyed by their tokens: the same row in any batch, any task, any meta-step is
    looked up, not recomputed. Under causal attention a right-padded row's hidden states at its real
    positions do not depend on the other rows of its batch, so rows cached from one batch are exact
    for any other (to float rounding).

    In memory by default. With ``directory`` each row is a file under a subfolder named by a
    fingerprint of the frozen layers (their shapes and weight sums, and ``cut``; a LoRA adapter still
    at B = 0 does not count: it is a no-op at any rank), so runs of the same frozen model, whatever
    their seed or adapter rank, share one folder and a different model can never read another's
    states."""

    def __init__(self, window: LayerWindow, cut: int, directory: str | os.PathLike | None = None):
        self.window, self.cut = window, cut
        self.rows: dict[bytes, torch.Tensor] = {}
        self.bytes = 0          # size of the distinct rows this run has used
        self.hits = self.misses = 0
        self.directory = None
        self._seen: set[bytes] = set()
        if directory is not None:
            self.directory = Path(directory) / self.fingerprint()
            self.directory.mkdir(parents=True, exist_ok=True)

    @torch.no_grad()
    def fingerprint(self) -> str:
        parts = self.window.parts
        digest = hashlib.sha256(f"cut={self.cut}".encode())
        modules = [parts.decoder.get_input_embeddings(), *parts.layers[:self.cut]]
        for module in modules:
            params = dict(module.named_parameters())
            for name, param in params.items():
                # A LoRA adapter whose B is zero (as every adapter starts, and as the frozen layers'
                # stay) is a no-op whatever its randomly drawn A and its rank: leave it out, so runs
                # with another seed or rank share the states they would compute identically.
                b = params.get(name.replace(".lora_A.", ".lora_B.")) if ".lora_A." in name else \
                    param if ".lora_B." in name else None
                if b is not None and not b.any():
                    continue
                digest.update(f"{name}{tuple(param.shape)}{param.dtype}{float(param.double().sum())!r}".encode())
        return digest.hexdigest()[:20]

    @staticmethod
    def _keys(batch: Batch) -> list[tuple[bytes, int]]:
        lengths = batch["attention_mask"].sum(1).tolist()
        ids = batch["input_ids"].cpu()
        return [(ids[r, :n].numpy().tobytes(), n) for r, n in enumerate(lengths)]

    def _file(self, key: bytes) -> Path:
        return self.directory / f"{hashlib.sha1(key).hexdigest()}.pt"

    def _get(self, key: bytes) -> torch.Tensor | None:
        if self.directory is None:
            return self.rows.get(key)
        path = self._file(key)
        if not path.is_file():
            return None
        return torch.load(path, weights_only=True, map_location=self.window.parts.head.weight.device)

    def _put(self, key: bytes, states: torch.Tensor) -> None:
        if self.directory is None:
            self.rows[key] = states
            return
        path = self._file(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(states.cpu(), tmp)
        os.replace(tmp, path)  # atomic: a run sharing the folder reads a whole file or none

    @torch.no_grad()
    def lookup(self, batch: Batch) -> torch.Tensor:
        """``[rows, length, hidden]``: each row's cached states, zero past its end."""
        if "attention_mask" not in batch:
            raise ValueError("PrefixCache needs collated rows with an attention mask")
        keys = self._keys(batch)
        found = [self._get(key) for key, _ in keys]
        missing = [r for r, states in enumerate(found) if states is None]
        if missing:
            sub = {k: v[missing] for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
            states = self.window.hidden(sub, 0, self.cut)
            for j, r in enumerate(missing):
                key, n = keys[r]
                found[r] = states[j, :n].detach().clone()
                self._put(key, found[r])
        for (key, _), states in zip(keys, found):
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += states.numel() * states.element_size()
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        out = found[0].new_zeros((len(keys), batch["input_ids"].shape[1], found[0].shape[-1]))
        for r, ((_, n), states) in enumerate(zip(keys, found)):
            out[r, :n] = states
        return out
