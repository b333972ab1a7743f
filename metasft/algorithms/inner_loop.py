"""The inner-loop engine every algorithm runs on.

An :class:`InnerLoop` owns the meta-parameters θ (all trainable weights, or only LoRA adapters:
the *scope* is just which parameters it is given) and offers the few operations the algorithms
are made of:

* ``snapshot()`` / ``restore()`` — remember θ at the start of a meta-step and put it back before
  each task (foreach copies into buffers allocated once per run);
* ``adapt_in_place(support_batches)`` — K plain-SGD steps φ ← φ − α ∇L_support(φ) applied to the
  model's own parameters (first-order algorithms; correct under activation checkpointing, since
  parameters only change between a backward pass and the next forward);
* ``adapt_functional(support_batches)`` — the same K steps as a differentiable function of θ through
  ``torch.func.functional_call`` (second-order MAML);
* ``loss(batch, weights=None)`` — the §2.3 token-mean loss, at the model's weights or at ``weights``;
* ``grad(loss, wrt)`` — gradients as a list aligned with θ (zeros where unused);
* ``stack(episodes)`` / ``batched_losses`` / ``adapt_batched`` — the same adaptation for T tasks at
  once (``meta.task_batching``): per-task weights stacked along a new first dimension and one
  ``torch.func.vmap`` over ``functional_call`` per inner step, so T tasks cost one pass of T-times
  larger operations instead of T passes (see "Task batching" below).

With learned inner rates (``meta.learn_inner_lr``, Meta-SGD / MAML++) every meta-parameter has its
own α — one per tensor, or one per tensor and inner step — in ``rates``; the inner steps use them,
and ``rates_meta_grad`` collects their meta-gradient (exact through the graph for MAML, the
first-order expression for FOMAML: :meth:`InnerLoop.accumulate_first_order_rates`).

Each algorithm then adds its task's contribution into ``meta_grad``; the trainer all-reduces it,
writes it to ``.grad`` and steps the outer optimizer.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch.func import functional_call, vmap

from metasft.data.collate import IGNORE_INDEX
from metasft.data.episodes import Batch, Episode
from metasft.distributed import has_dtensors
from metasft.errors import MetasftError
from metasft.losses import accepts_logits_to_keep, lm_loss, target_positions
from metasft.scope import ALL, LayerWindow, PrefixCache, Scope, frozen_below, inner_indices



@dataclass
class TaskBatch:
    """The episodes of T tasks stacked for one batched pass: each inner step's support batches and
    the query batches, padded to common shapes ``[T, rows, length]`` (see :func:`stack_batches`)."""

    episodes: list[Episode]
    support: list[Batch]
    query: Batch | None

    @property
    def size(self) -> int:
        return len(self.episodes)


def stack_batches(batches: list[Batch]) -> Batch:
    """Stack T tasks' collated batches into ``input_ids``/``labels`` of shape ``[T, rows, length]``.

    Rows and lengths differ between tasks, so shorter rows are right-padded further and missing
    rows are added, all with label ``IGNORE_INDEX``: every task keeps exactly its own targets, and
    its loss its own normalisation (SPEC §2.3). No attention mask is passed: collated rows are
    right-padded, and under causal attention a token never sees a later one, so the padding (any
    token id: 0 here) changes no logit at a real position, the same logits the masked sequential
    pass computes."""
    if any("global_num_targets" in b for b in batches):
        raise ValueError("task batching needs whole per-task batches, not FSDP row shards")
    rows = max(b["input_ids"].shape[0] for b in batches)
    length = max(b["input_ids"].shape[1] for b in batches)
    first = batches[0]["input_ids"]
    input_ids = first.new_zeros((len(batches), rows, length))
    labels = first.new_full((len(batches), rows, length), IGNORE_INDEX)
    for t, b in enumerate(batches):
        r, n = b["input_ids"].shape
        input_ids[t, :r, :n] = b["input_ids"]
        labels[t, :r, :n] = b["labels"]
    stacked = {"input_ids": input_ids, "labels": labels}
    if "inputs_embeds" in batches[0]:  # the prefix's hidden states (scope.LayerWindow), zero-padded alike
        states = [b["inputs_embeds"] for b in batches]
        # torch.stack of padded copies, not writes into a zero tensor: the states may carry a graph.
        stacked["inputs_embeds"] = torch.stack([
            torch.nn.functional.pad(h, (0, 0, 0, length - h.shape[1], 0, rows - h.shape[0])) for h in states])
    return stacked


@dataclass
class TaskMetrics:
    task: str
    support_loss_first: float | None = None   # L_support(θ) on the first inner batch
    query_loss_pre: float | None = None       # L_query(θ), only when asked (costs a forward)
    query_loss_post: float | None = None      # L_query(φ_K)
    tokens: int = 0                           # tokens processed (forward passes), for tokens/s
    finite: bool = True
    extra: dict = field(default_factory=dict)


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Plain tensors for foreach ops: under FSDP2 parameters and gradients are DTensors, and the
    update of a shard is the same update on its local tensor (which shares the storage).

    Plain tensors pass through as they are (every caller runs under ``no_grad``): a ``detach()``
    per tensor per call was ~3,000 needless ops per meta-step."""
    if not has_dtensors(tensors):
        return tensors
    return [t.detach().to_local() if hasattr(t, "to_local") else t.detach() for t in tensors]


def _tokens(batch: Batch) -> int:
    return int(batch["attention_mask"].sum())


class InnerLoop:
    """Adaptation machinery over an ordered list of meta-parameters (see module docstring)."""

    def __init__(self, model: torch.nn.Module, named_params: list[tuple[str, torch.nn.Parameter]],
                 inner_lr: float, num_inner_steps: int, autocast_dtype: torch.dtype | None = None,
                 force_math_attention: bool = True, grad_via_backward: bool = False,
                 learn_inner_lr: str = "none", inner_scope: Scope = ALL, prefix_cache: bool = False):
        if not named_params:
            raise ValueError("InnerLoop needs at least one trainable parameter")
        self.model = model
        self.names = [name for name, _ in named_params]
        self.params = [param for _, param in named_params]
        # The inner scope: which meta-parameters the inner loop adapts (meta.inner_scope); the rest of
        # θ stays at θ during adaptation and gets its meta-gradient from the query loss.
        self.inner_scope = inner_scope
        self.inner_index = inner_indices(model, named_params, inner_scope)
        self.inner_names = [self.names[i] for i in self.inner_index]
        self.inner_params = [self.params[i] for i in self.inner_index]
        self._configure_prefix(named_params, prefix_cache)
        self.inner_lr = inner_lr
        self.num_inner_steps = num_inner_steps
        self.autocast_dtype = autocast_dtype
        # Only passes that are differentiated twice (MAML's support passes) need the math kernel;
        # False exists to show what goes wrong without it.
        self.force_math_attention = force_math_attention
        # FSDP2 delivers (reduce-scattered) gradients through .grad in backward(); autograd.grad
        # would bypass its hooks. First-order paths then read .grad instead.
        self.grad_via_backward = grad_via_backward
        # Called before the engine writes to parameters in place (FSDP: drop gathered copies).
        self.before_param_write = lambda: None
        self.device = self.params[0].device
        with torch.no_grad():
            self.theta = [p.detach().clone() for p in self.params]
            self.meta_grad = [torch.zeros_like(p) for p in self.params]
        # Learned inner rates: α per meta-parameter, shape [] (per_tensor) or [K] (per step),
        # initialised at inner_lr. ``learning_rates``: the inner steps record what the first-order
        # α-gradient needs (training); adapting with loaded rates does not.
        self.rates: list[torch.nn.Parameter] = []
        self.rates_meta_grad: list[torch.Tensor] = []
        self.learning_rates = learn_inner_lr != "none"
        self._inner_grads: list | None = None
        self._rate_floats: dict[int, list[float]] | None = None
        if self.learning_rates:
            shape = (num_inner_steps,) if learn_inner_lr == "per_tensor_per_step" else ()
            self.set_rates([torch.full(shape, float(inner_lr), device=self.device) for _ in self.inner_params])

    # ------------------------------------------------------------------ frozen layers computed once
    def _configure_prefix(self, named_params, prefix_cache: bool) -> None:
        """``split_at``: the lowest decoder layer holding an inner-scope parameter. The layers below do
        not change during the inner loop, so each batch's hidden states entering ``split_at`` are
        computed once (:meth:`with_prefix`) and every inner step runs only the layers above.
        ``prefix_cache``: the layers below the lowest *meta*-parameter never change at all, so their
        states are kept per row for the run (:class:`~metasft.scope.PrefixCache`)."""
        self.window, self.split_at, self.prefix_cache, self.prefix_trainable = None, 0, None, False
        if len(self.inner_index) == len(self.params) and not prefix_cache:
            return
        try:
            window = LayerWindow(self.model)
        except MetasftError:
            if self.inner_scope.kind != "all":
                raise
            return  # not a Llama-style decoder: run every layer, as before
        inner = [named_params[i] for i in self.inner_index]
        self.split_at = frozen_below(window.parts, inner)
        cut = frozen_below(window.parts, named_params) if prefix_cache else 0
        if self.split_at == 0:
            return
        self.window = window
        self.prefix_cache = PrefixCache(window, cut) if cut > 0 else None
        self.prefix_trainable = cut < self.split_at  # meta-parameters below the split: keep their graph

    def with_prefix(self, batch: Batch, graph: bool = False) -> Batch:
        """``batch`` plus ``inputs_embeds``, the hidden states entering layer ``split_at`` (unchanged
        when there is no split). ``graph``: keep the graph to the meta-parameters below the split
        (query passes, and MAML's support passes); the inner steps' own gradients never need it."""
        if self.window is None:
            return batch
        start, states = 0, None
        if self.prefix_cache is not None:
            start, states = self.prefix_cache.cut, self.prefix_cache.lookup(batch)
        if start < self.split_at:
            with torch.set_grad_enabled(graph and self.prefix_trainable and torch.is_grad_enabled()), self._context():
                states = self.window.hidden(batch, start, self.split_at, states)
        return {**batch, "inputs_embeds": states}

    def prepare_episode(self, episode: Episode, support_graph: bool = False, query_graph: bool = True) -> Episode:
        """The episode with every batch's prefix states attached, computed once per distinct batch:
        K support batches drawn from a support set no larger than a batch are the same rows."""
        if self.window is None:
            return episode
        done: list[tuple[Batch, Batch]] = []

        def prepared(batch: Batch, graph: bool) -> Batch:
            for source, result in done:
                if source["input_ids"].shape == batch["input_ids"].shape and torch.equal(source["input_ids"], batch["input_ids"]) \
                        and torch.equal(source["labels"], batch["labels"]):
                    return result
            result = self.with_prefix(batch, graph)
            done.append((batch, result))
            return result

        support = [prepared(b, support_graph) for b in episode.support_batches]
        query = None if episode.query_batch is None else self.with_prefix(episode.query_batch, query_graph)
        return Episode(episode.task, support, query, episode.num_targets)

    # ------------------------------------------------------------------ learned inner rates
    def set_rates(self, values: list[torch.Tensor]) -> None:
        """Give every meta-parameter its own inner rate (a scalar, or one per inner step)."""
        self.rates = [torch.nn.Parameter(v.detach().clone().float().to(self.device)) for v in values]
        self.rates_meta_grad = [torch.zeros_like(r) for r in self.rates]
        self._rate_floats = None

    def load_rates(self, by_name: dict[str, torch.Tensor], source: str = "inner_lrs.safetensors") -> None:
        """Set the rates from a checkpoint's ``inner_lrs.safetensors`` (every meta-parameter's)."""
        from metasft.errors import MetasftError

        missing = [n for n in self.inner_names if n not in by_name]
        if missing:
            raise MetasftError(f"{source}: no inner rate for {missing[0]} (was it saved for another model or scope?)")
        values = [by_name[n] for n in self.inner_names]
        if self.rates and any(v.shape != r.shape for v, r in zip(values, self.rates)):
            raise MetasftError(f"{source}: rates of shape {tuple(values[0].shape)} do not fit meta.learn_inner_lr "
                               f"(shape {tuple(self.rates[0].shape)})")
        if self.rates:
            with torch.no_grad():
                for rate, value in zip(self.rates, values):
                    rate.copy_(value)
            self._rate_floats = None
        else:
            self.set_rates(values)

    def rates_by_name(self) -> dict[str, torch.Tensor]:
        return {name: r.detach().clone() for name, r in zip(self.inner_names, self.rates)}

    def _rate(self, index: int, step: int) -> torch.Tensor:
        rate = self.rates[index]
        # Per-step rates beyond the K that were learnt (an adaptation of more steps) keep the last.
        return rate if rate.dim() == 0 else rate[min(step, rate.shape[0] - 1)]

    def _step_rates(self, step: int) -> list[float]:
        """The first-order paths' rates as Python numbers, read once per value of the rates (they
        change only at the outer step): a device sync per tensor per inner step would not be free."""
        if self._rate_floats is None:
            self._rate_floats = {}
        if step not in self._rate_floats:
            self._rate_floats[step] = [float(self._rate(i, step)) for i in range(len(self.inner_params))]
        return self._rate_floats[step]

    def _record_inner_grads(self, step: int, grads: list[torch.Tensor]) -> None:
        """Keep what the first-order α-gradient needs: Σ_k g_k per tensor, or every g_k per step."""
        if not self.learning_rates:
            return
        with torch.no_grad():
            if self.rates[0].dim() > 0:
                self._inner_grads.append([g.detach().clone() for g in grads])
            elif step == 0:
                self._inner_grads = [[g.detach().clone() for g in grads]]
            else:
                torch._foreach_add_(self._inner_grads[0], [g.detach() for g in grads])

    @torch.no_grad()
    def accumulate_first_order_rates(self, query_grads: list[torch.Tensor], weight: float) -> None:
        """FOMAML's α-gradient × ``weight`` into ``rates_meta_grad``.

        The first-order approximation treats each inner gradient g_k as a constant, so
        φ_K = θ − Σ_k α_k ⊙ g_k and ∂L_query(φ_K)/∂α_k = −⟨∇_φ L_query(φ_K), g_k⟩ over the tensor's
        elements; with one α per tensor (all steps) it is −⟨∇_φ L_query, Σ_k g_k⟩. Stacked [T, ...]
        gradients (task batching) give the sum over the T tasks."""
        if not self.learning_rates:
            return
        for i, (rate, q) in enumerate(zip(self.rates_meta_grad, query_grads)):
            dots = torch.stack([-(q.detach() * step_grads[i]).sum() for step_grads in self._inner_grads])
            rate.add_((dots if rate.dim() > 0 else dots.sum()).to(rate.dtype), alpha=weight)
        self._inner_grads = None

    def accumulate_through_inner_loop(self, loss: torch.Tensor, weight: float) -> None:
        """MAML: ∇_θ ``loss`` through the inner loop (and ∇_α with learned rates) × ``weight``."""
        if not self.learning_rates:
            self.accumulate(self.grad(loss), weight)
            return
        grads = self.grad(loss, self.params + self.rates)
        self.accumulate(grads[:len(self.params)], weight)
        with torch.no_grad():
            torch._foreach_add_(self.rates_meta_grad, grads[len(self.params):], alpha=weight)

    @torch.no_grad()
    def project_rates(self) -> None:
        """Keep every α ≥ 0 after an outer step (a negative rate would ascend the support loss)."""
        for rate in self.rates:
            rate.clamp_(min=0.0)
        self._rate_floats = None

    # ------------------------------------------------------------------ θ bookkeeping
    @torch.no_grad()
    def snapshot(self) -> None:
        torch._foreach_copy_(_local(self.theta), _local(self.params))

    @torch.no_grad()
    def restore(self) -> None:
        """Put θ back into the inner scope, the only parameters adaptation writes to. The others are
        left alone: a prepared batch's prefix states may hold a graph to them (an in-place copy would
        invalidate it)."""
        self.before_param_write()
        torch._foreach_copy_(_local(self.inner_params), _local([self.theta[i] for i in self.inner_index]))

    @torch.no_grad()
    def zero_meta_grad(self) -> None:
        torch._foreach_zero_(_local(self.meta_grad))
        if self.rates_meta_grad:
            torch._foreach_zero_(self.rates_meta_grad)

    @torch.no_grad()
    def accumulate(self, grads: list[torch.Tensor], weight: float, index: list[int] | None = None) -> None:
        """meta_grad += weight × grads (aligned with θ, or with ``index`` into it)."""
        target = self.meta_grad if index is None else [self.meta_grad[i] for i in index]
        torch._foreach_add_(_local(target), _local(grads), alpha=weight)

    @torch.no_grad()
    def meta_grad_norm(self, sharded: bool) -> float:
        """Global L2 norm of the meta-gradient (summing shard norms across ranks under FSDP)."""
        local = _local(self.meta_grad)
        squares = float(torch.stack([n.float() ** 2 for n in torch._foreach_norm(local)]).sum())
        if sharded:
            from metasft.distributed import all_reduce_scalars

            squares = all_reduce_scalars([squares], self.device)[0]
        return math.sqrt(squares)

    @torch.no_grad()
    def clip_meta_grad(self, max_norm: float, norm: float) -> None:
        """Scale the meta-gradient to ``max_norm`` when larger (as ``clip_grad_norm_`` does)."""
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            torch._foreach_mul_(_local(self.meta_grad), coef)

    @torch.no_grad()
    def write_meta_grad(self) -> None:
        """Leave the meta-gradient in ``.grad`` for the outer optimizer (and clipping)."""
        # The buffer itself, not a copy: optimizers read .grad without modifying it, and the buffer
        # is zeroed at the start of the next meta-step.
        for param, grad in zip(self.params + self.rates, self.meta_grad + self.rates_meta_grad):
            param.grad = grad

    # ------------------------------------------------------------------ losses and gradients
    def _context(self, double_backward: bool = False, vmapped: bool = False):
        stack = contextlib.ExitStack()
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype))
        if vmapped and self.autocast_dtype is not None:
            stack.enter_context(_AutocastAttention(self.autocast_dtype))
        # Under vmap the math kernel too: the fused kernels' backward has no batching rule, and
        # vmap would fall back to a slow per-task loop for it.
        if (double_backward and self.force_math_attention) or vmapped:
            # Fused SDPA kernels (flash, memory-efficient, CPU flash) have no double backward;
            # the math kernel is plain differentiable ops, so second-order MAML stays exact.
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack

    def loss(self, batch: Batch, weights: dict[str, torch.Tensor] | None = None,
             num_targets: int | None = None, double_backward: bool = False) -> torch.Tensor:
        """``double_backward``: the loss's gradient will itself be differentiated (MAML's support
        passes); the query pass at φ_K is differentiated once and keeps the fused kernels."""
        with self._context(double_backward), self._suffix(batch):
            if weights is None:
                return lm_loss(self.model, batch, num_targets)
            return lm_loss(_FunctionalModel(self.model, weights), batch, num_targets, module=self.model)

    def _suffix(self, batch: Batch):
        """Run only the layers from ``split_at`` up when the batch carries their input states."""
        if "inputs_embeds" in batch and self.window is not None:
            return self.window.suffix(self.split_at)
        return contextlib.nullcontext()

    def grad(self, loss: torch.Tensor, wrt: list[torch.Tensor] | None = None,
             create_graph: bool = False) -> list[torch.Tensor]:
        if self.grad_via_backward and wrt is None and not create_graph:
            for param in self.params:
                param.grad = None
            loss.backward()
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
            for param in self.params:
                param.grad = None
            return grads
        wrt = self.params if wrt is None else wrt
        grads = torch.autograd.grad(loss, wrt, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]

    def query_grads(self, loss: torch.Tensor, adapted: dict[str, torch.Tensor]) -> tuple[list, list]:
        """First-order meta-gradient of a (summed) query ``loss`` at the adapted weights: returns
        the gradient aligned with θ — the inner scope's at φ (summed over a stack's tasks), the
        other meta-parameters' at θ — and the inner scope's own, stacked ``[T, ...]`` as φ is."""
        others = [i for i in range(len(self.params)) if i not in set(self.inner_index)]
        grads = self.grad(loss, list(adapted.values()) + [self.params[i] for i in others])
        inner, rest = grads[:len(adapted)], grads[len(adapted):]
        full: list = [None] * len(self.params)
        for i, g in zip(self.inner_index, inner):
            full[i] = g.sum(0) if g.dim() > self.params[i].dim() else g
        for i, g in zip(others, rest):
            full[i] = g
        return full, inner

    def inner_part(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The inner scope's entries of a list aligned with θ."""
        return [grads[i] for i in self.inner_index]

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> float:
        return float(self.loss(batch))

    # ------------------------------------------------------------------ adaptation
    def adapt_in_place(self, support_batches: list[Batch], metrics: TaskMetrics | None = None,
                       optimizer: torch.optim.Optimizer | None = None, lr: float | None = None) -> None:
        """φ ← φ − α ∇L_support(φ) for each batch, on the model's inner-scope parameters (first
        order); α is ``lr`` when given (adaptation at test time), else ``inner_lr`` or the learned rates.

        With ``optimizer`` (Reptile's optional inner Adam) that optimizer steps instead of SGD."""
        lr = self.inner_lr if lr is None else lr
        if self.learning_rates:
            self._inner_grads = []
        whole = len(self.inner_params) == len(self.params)
        for step, batch in enumerate(support_batches):
            loss = self.loss(batch)
            _record_inner_step(metrics, step, batch, loss)
            grads = self.grad(loss, None if whole else self.inner_params)
            self._record_inner_grads(step, grads)
            self.before_param_write()
            if optimizer is None and self.rates:
                with torch.no_grad():
                    torch._foreach_sub_(_local(self.inner_params), torch._foreach_mul(_local(grads), self._step_rates(step)))
            elif optimizer is None:
                with torch.no_grad():
                    torch._foreach_add_(_local(self.inner_params), _local(grads), alpha=-lr)
            else:
                for param, g in zip(self.inner_params, grads):
                    param.grad = g
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    def adapt_functional(self, support_batches: list[Batch], create_graph: bool = True,
                         metrics: TaskMetrics | None = None) -> dict[str, torch.Tensor]:
        """The same SGD steps as a function of θ: returns φ_K with the graph back to θ kept
        (``create_graph``), so a query loss at φ_K differentiates through the inner loop."""
        # Only the inner scope is replaced; the other meta-parameters enter as the module's own θ.
        weights = dict(zip(self.inner_names, self.inner_params))
        for step, batch in enumerate(support_batches):
            loss = self.loss(batch, weights, double_backward=create_graph)
            _record_inner_step(metrics, step, batch, loss)
            grads = self.grad(loss, list(weights.values()), create_graph=create_graph)
            weights = self._sgd_step(weights, grads, step)
        return weights

    def _sgd_step(self, weights: dict[str, torch.Tensor], grads: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """φ − α ∇L as differentiable ops (MAML keeps their graph): α from the learned rates when
        there are any (in the graph too), else ``inner_lr``."""
        if self.rates:
            return {n: w - self._rate(i, step) * g for i, ((n, w), g) in enumerate(zip(weights.items(), grads))}
        # torch.add with alpha: one differentiable op per tensor instead of a mul and a sub.
        return {n: torch.add(w, g, alpha=-self.inner_lr) for (n, w), g in zip(weights.items(), grads)}


    # ------------------------------------------------------------------ task batching
    # T tasks adapt together: each meta-parameter becomes a [T, ...] stack of per-task weights, and
    # one vmap over functional_call computes the T losses of an inner step, [T]. The gradient of
    # their *sum* with respect to the stack is, slice by slice, each task's own gradient (task t's
    # loss depends only on slice t), so every update below is the sequential update, T at a time.
    # Under LoRA only the adapters are stacked; the frozen base is shared and its matmuls batch
    # over all T tasks' rows. θ itself is never written to.

    def stack(self, episodes: list[Episode]) -> TaskBatch:
        """T (prepared) episodes as one :class:`TaskBatch`."""
        num_steps = len(episodes[0].support_batches)
        support = [stack_batches([ep.support_batches[k] for ep in episodes]) for k in range(num_steps)]
        query = None
        if all(ep.query_batch is not None for ep in episodes):
            query = stack_batches([ep.query_batch for ep in episodes])
        return TaskBatch(episodes, support, query)

    def batched_losses(self, weights: dict[str, torch.Tensor] | None, batch: Batch,
                       double_backward: bool = False) -> torch.Tensor:
        """The §2.3 loss of each task, ``[T]``: task t's batch at its weights ``weights[name][t]``
        (or at θ, shared by every task, when ``weights`` is None)."""
        # Target positions are data-dependent, so they are found here, over every task's rows, not
        # inside vmap; padding rows and tasks with fewer targets just ignore the extra positions.
        positions = target_positions(batch["labels"]) if accepts_logits_to_keep(self.model) else None
        with self._context(double_backward, vmapped=True), self._suffix(batch):
            if weights is None:
                return vmap(lambda b: lm_loss(self.model, b, positions=positions), randomness="different")(batch)
            return vmap(lambda w, b: lm_loss(_FunctionalModel(self.model, w), b, positions=positions, module=self.model),
                        randomness="different")(weights, batch)

    def adapt_batched(self, batch: TaskBatch, metrics: list[TaskMetrics], create_graph: bool = False,
                      inner_optimizer: str = "sgd") -> dict[str, torch.Tensor]:
        """K inner steps of T tasks at once; returns φ_K stacked ``[T, ...]`` per meta-parameter.

        ``create_graph`` (MAML): φ stays a differentiable function of θ. Otherwise each φ is a
        detached leaf that requires grad (first order). ``inner_optimizer="adam"`` (Reptile) runs
        ``torch.optim.Adam``'s update with default hyperparameters and fresh moments per task."""
        size = batch.size
        if create_graph:
            weights = {n: p.unsqueeze(0).expand(size, *p.shape) for n, p in zip(self.inner_names, self.inner_params)}
        else:
            weights = {n: p.detach().unsqueeze(0).expand(size, *p.shape).requires_grad_()
                       for n, p in zip(self.inner_names, self.inner_params)}
        adam = _StackedAdam(self.inner_lr) if inner_optimizer == "adam" else None
        if self.learning_rates:
            self._inner_grads = []
        for step, support in enumerate(batch.support):
            losses = self.batched_losses(weights, support, double_backward=create_graph)
            for value, m, ep in zip(losses.detach().tolist(), metrics, batch.episodes):
                _record_inner_step(m, step, ep.support_batches[step], value)
            grads = self.grad(losses.sum(), list(weights.values()), create_graph=create_graph)
            if create_graph:
                weights = self._sgd_step(weights, grads, step)
                continue
            self._record_inner_grads(step, grads)
            with torch.no_grad():
                if adam is None and self.rates:
                    new = [w - rate * g for w, g, rate in zip(weights.values(), grads, self._step_rates(step))]
                elif adam is None:
                    new = [torch.add(w, g, alpha=-self.inner_lr) for w, g in zip(weights.values(), grads)]
                else:
                    new = adam.step(list(weights.values()), grads)
            weights = {n: w.requires_grad_() for n, w in zip(weights, new)}
        return weights

    @torch.no_grad()
    def record_query_loss_pre(self, batch: TaskBatch, metrics: list[TaskMetrics]) -> None:
        """Each task's query loss at θ (before adaptation), one batched forward for all tasks."""
        self.record_query_losses(batch, metrics, self.batched_losses(None, batch.query), "query_loss_pre",
                                 count_tokens=False)

    def record_query_losses(self, batch: TaskBatch, metrics: list[TaskMetrics], losses: torch.Tensor,
                            attribute: str, count_tokens: bool) -> None:
        for value, m, ep in zip(losses.detach().tolist(), metrics, batch.episodes):
            setattr(m, attribute, value)
            if count_tokens:
                m.tokens += _tokens(ep.query_batch)


class _AutocastAttention(torch.overrides.TorchFunctionMode):
    """Casts ``scaled_dot_product_attention``'s query, key and value to the autocast dtype.

    Outside vmap, autocast does this itself. Under vmap (torch 2.13) it does not reach the op: after
    a fp32 rotary embedding, bf16 runs reach it with fp32 query/key and a bf16 value, which it
    refuses. Linear layers and matmuls are still autocast under vmap (checked), so this restores
    exactly what the sequential bf16 pass computes."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and torch.is_autocast_enabled(_device_type(args)):
            args = tuple(a.to(self.dtype) if i < 3 and torch.is_tensor(a) else a for i, a in enumerate(args))
            kwargs = {k: v.to(self.dtype) if k in ("query", "key", "value") and torch.is_tensor(v) else v
                      for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _device_type(args) -> str:
    return args[0].device.type if args and torch.is_tensor(args[0]) else "cpu"


class _StackedAdam:
    """``torch.optim.Adam(lr)`` (betas 0.9/0.999, eps 1e-8, no weight decay) on stacked per-task
    weights: the update is elementwise, so stacking T tasks' moments is T independent Adams."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.steps, self.exp_avg, self.exp_avg_sq = 0, None, None

    def step(self, weights: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        beta1, beta2 = self.betas
        if self.exp_avg is None:
            self.exp_avg = [torch.zeros_like(g) for g in grads]
            self.exp_avg_sq = [torch.zeros_like(g) for g in grads]
        self.steps += 1
        bias1, bias2 = 1 - beta1 ** self.steps, 1 - beta2 ** self.steps
        out = []
        for w, g, m, v in zip(weights, grads, self.exp_avg, self.exp_avg_sq):
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(bias2)).add_(self.eps)
            out.append(torch.addcdiv(w.detach(), m, denom, value=-self.lr / bias1))
        return out


def _record_inner_step(metrics: TaskMetrics | None, step: int, batch: Batch, loss: torch.Tensor | float) -> None:
    if metrics is None:
        return
    metrics.tokens += _tokens(batch)
    value = loss if isinstance(loss, float) else float(loss.detach())
    if step == 0:
        metrics.support_loss_first = value
    if not math.isfinite(value):
        metrics.finite = False


class _FunctionalModel:
    """Calls ``model`` with some parameters replaced by ``weights`` (torch.func.functional_call);
    tied parameters follow the replaced one."""

    def __init__(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]):
        self.model, self.weights = model, weights

    def __call__(self, **kwargs):
        return functional_call(self.model, self.weights, args=(), kwargs=kwargs, tie_weights=True, strict=False)
