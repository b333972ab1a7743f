"""The inner-loop engine every algorithm runs on: one adaptation path for one task or many.

An :class:`InnerLoop` owns the meta-parameters θ (all trainable weights, LoRA adapters, or the top
layers: ``model.lora_*`` and ``model.train_top_layers``) and, within them, the *inner scope* the inner
loop adapts (``meta.inner_scope``: all, the head, the top layers). Algorithms are made of:

* ``stack(episodes)`` — T tasks' (prepared) episodes as one :class:`TaskBatch` (T = 1 keeps the
  task's own batches);
* ``adapt(tasks, metrics, second_order, rule)`` — K inner steps of an update rule
  (:mod:`metasft.algorithms.updates`: SGD, learned rates, Adam) on T tasks at once; φ is held in
  place in the model (one task, first order) or stacked ``[T, ...]`` (see "adaptation" below);
* ``losses(batch, adapted)`` — each task's §2.3 loss, ``[T]``;
* ``first_order_grads`` / ``accumulate_through_inner_loop`` / ``displacement`` — the three ways the
  algorithms turn an adaptation into a meta-gradient contribution, added into ``meta_grad``;
* ``snapshot()`` / ``restore()`` — θ at the start of a meta-step, put back before each task.

Layers below the inner scope run once per batch (``prepare_episode``), and below the meta-parameters
once per row for the run (``scope.PrefixCache``).

With learned inner rates (``meta.learn_inner_lr``, Meta-SGD / MAML++) every inner-scope tensor has
its own α — one per tensor, or one per tensor and inner step — in ``rates``; the inner steps use
them, and ``rates_meta_grad`` collects their meta-gradient (exact through the graph for MAML, the
first-order expression for FOMAML: :meth:`InnerLoop.accumulate_first_order_rates`).

The trainer all-reduces ``meta_grad``, writes it to ``.grad`` and steps the outer optimizer.
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
from metasft.losses import accepts_logits_to_keep, lm_loss, logits_at_targets, target_positions
from metasft.algorithms.factored_head import LowRankB, PerTaskLinear, find_head_b, installed
from metasft.algorithms.updates import SGD, Adam, LearnedSGD, step_in_place
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


@dataclass
class Adapted:
    """The outcome of :meth:`InnerLoop.adapt`: φ stacked ``[T, ...]`` per inner-scope tensor (a lone
    task's unstacked; None: held in the model's own parameters), and with learned rates under first order each inner step's
    gradients (what the α-gradient needs; nothing is left behind in the engine between calls)."""

    weights: dict[str, torch.Tensor] | None
    inner_grads: list[list[torch.Tensor]] | None = None
    # The head's LoRA B kept factored (metasft.algorithms.factored_head), not in ``weights``.
    head_b: LowRankB | None = None


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
                 learn_inner_lr: str = "none", inner_scope: Scope = ALL, prefix_cache: bool = False,
                 prefix_cache_dir: str | None = None):
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
        self._configure_prefix(named_params, prefix_cache, prefix_cache_dir)
        # The head's LoRA B in the inner scope, which MAML's inner loop keeps factored (B_0 + U M).
        self.head_b = find_head_b(model, self.inner_params)
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
        # Learned inner rates: α per inner-scope tensor, shape [] (per_tensor) or [K] (per step),
        # initialised at inner_lr. ``learning_rates``: the inner steps record what the first-order
        # α-gradient needs (training); adapting with loaded rates does not.
        self.rates: list[torch.nn.Parameter] = []
        self.rates_meta_grad: list[torch.Tensor] = []
        self.learning_rates = learn_inner_lr != "none"
        if self.learning_rates:
            shape = (num_inner_steps,) if learn_inner_lr == "per_tensor_per_step" else ()
            self.set_rates([torch.full(shape, float(inner_lr), device=self.device) for _ in self.inner_params])

    # ------------------------------------------------------------------ frozen layers computed once
    def _configure_prefix(self, named_params, prefix_cache: bool, prefix_cache_dir: str | None = None) -> None:
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
        self.prefix_cache = PrefixCache(window, cut, prefix_cache_dir) if cut > 0 else None
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
        """Give every inner-scope tensor its own inner rate (a scalar, or one per inner step)."""
        self.rates = [torch.nn.Parameter(v.detach().clone().float().to(self.device)) for v in values]
        self.rates_meta_grad = [torch.zeros_like(r) for r in self.rates]

    def load_rates(self, by_name: dict[str, torch.Tensor], source: str = "inner_lrs.safetensors") -> None:
        """Set the rates from a checkpoint's ``inner_lrs.safetensors`` (every inner-scope tensor's)."""
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
        else:
            self.set_rates(values)

    def rates_by_name(self) -> dict[str, torch.Tensor]:
        return {name: r.detach().clone() for name, r in zip(self.inner_names, self.rates)}

    def update_rule(self, lr: float | None = None, optimizer: str = "sgd"):
        """The inner update: Adam with fresh moments (``adam``; ``adamw`` has no weight decay here,
        so it is the same), else SGD with the learned rates when the engine holds any, else SGD at
        ``lr`` (default ``inner_lr``)."""
        lr = self.inner_lr if lr is None else lr
        if optimizer in ("adam", "adamw"):
            return Adam(lr)
        return LearnedSGD(self.rates) if self.rates else SGD(lr)

    @torch.no_grad()
    def accumulate_first_order_rates(self, query_grads: list[torch.Tensor], adapted: "Adapted", weight: float) -> None:
        """FOMAML's α-gradient × ``weight`` into ``rates_meta_grad``.

        The first-order approximation treats each inner gradient g_k as a constant, so
        φ_K = θ − Σ_k α_k ⊙ g_k and ∂L_query(φ_K)/∂α_k = −⟨∇_φ L_query(φ_K), g_k⟩ over the tensor's
        elements; with one α per tensor (all steps) it is −⟨∇_φ L_query, Σ_k g_k⟩. Stacked [T, ...]
        gradients (task batching) give the sum over the T tasks."""
        if not self.learning_rates:
            return
        for i, (rate, q) in enumerate(zip(self.rates_meta_grad, query_grads)):
            dots = torch.stack([-(q.detach() * step_grads[i]).sum() for step_grads in adapted.inner_grads])
            rate.add_((dots if rate.dim() > 0 else dots.sum()).to(rate.dtype), alpha=weight)

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
    @contextlib.contextmanager
    def prefixed(self, batch: Batch):
        """Within: ``batch`` with the states entering ``split_at`` attached (:meth:`with_prefix`, from
        the prefix cache when there is one), and the model running only the layers from there up; for
        evaluating rows at the current weights, as adaptation runs them."""
        batch = self.with_prefix(batch)
        with self._context(), self._suffix(batch):
            yield batch

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

    def inner_part(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The inner scope's entries of a list aligned with θ."""
        return [grads[i] for i in self.inner_index]

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> float:
        return float(self.loss(batch))

    # ------------------------------------------------------------------ adaptation (one path)
    # T tasks adapt together. φ lives in one of two storages, chosen per pass:
    #  * in place: the model's own inner-scope parameters hold φ (T = 1, first order). Parameters
    #    change only between a backward and the next forward, so activation checkpointing and FSDP's
    #    sharded parameters stay correct, and full weights of a large model need no second copy.
    #  * stacked: each inner-scope tensor becomes a [T, ...] stack of per-task weights, and one
    #    torch.func.vmap over functional_call computes the T losses of an inner step, [T]. The
    #    gradient of their sum with respect to the stack is, slice by slice, each task's own gradient
    #    (task t's loss depends only on slice t). Under LoRA only the adapters are stacked and the
    #    frozen base's matmuls batch over all T tasks' rows. With T = 1 the slice is called directly,
    #    without vmap. MAML always uses it: φ stays a differentiable function of θ.
    # θ itself is never written to in the stacked storage.

    def stack(self, episodes: list[Episode]) -> TaskBatch:
        """T (prepared) episodes as one :class:`TaskBatch`; a lone task keeps its own batches."""
        if len(episodes) == 1:
            ep = episodes[0]
            return TaskBatch(episodes, list(ep.support_batches), ep.query_batch)
        num_steps = len(episodes[0].support_batches)
        support = [stack_batches([ep.support_batches[k] for ep in episodes]) for k in range(num_steps)]
        query = None
        if all(ep.query_batch is not None for ep in episodes):
            query = stack_batches([ep.query_batch for ep in episodes])
        return TaskBatch(episodes, support, query)

    def losses(self, batch: Batch, adapted: "Adapted | None" = None, double_backward: bool = False) -> torch.Tensor:
        """The §2.3 loss of each task, ``[T]``: task t's rows at its adapted weights (at the model's
        own parameters when ``adapted`` is None or held in place)."""
        weights = None if adapted is None else adapted.weights
        if adapted is not None and adapted.head_b is not None:
            if batch["input_ids"].dim() == 3:
                return self._task_rows_losses(batch, adapted, double_backward)
            with installed(self.head_b, adapted.head_b):
                return self.loss(batch, weights, double_backward=double_backward).unsqueeze(0)
        if batch["input_ids"].dim() == 2:  # one task: its own collated batch, its weights unstacked
            return self.loss(batch, weights, double_backward=double_backward).unsqueeze(0)
        # Target positions are data-dependent, so they are found here, over every task's rows, not
        # inside vmap; padding rows and tasks with fewer targets just ignore the extra positions.
        positions = target_positions(batch["labels"]) if accepts_logits_to_keep(self.model) else None
        with self._context(double_backward, vmapped=True), self._suffix(batch):
            if weights is None:
                return vmap(lambda b: lm_loss(self.model, b, positions=positions, gather=False),
                            randomness="different")(batch)
            return vmap(lambda w, b: lm_loss(_FunctionalModel(self.model, w), b, positions=positions, module=self.model,
                                             gather=False),
                        randomness="different")(weights, batch)

    def adapt(self, tasks: TaskBatch, metrics: list[TaskMetrics] | None = None, second_order: bool = False,
              rule=None, factor_head: bool = False) -> "Adapted":
        """K inner steps of ``rule`` (default :meth:`update_rule`) on every task's support batches.

        ``second_order`` (MAML): φ stays a differentiable function of θ (and of learned rates).
        Otherwise each step's gradient is a constant; with learned rates those gradients are kept
        in the returned :class:`Adapted` for the first-order α-gradient. ``factor_head``: a
        first-order caller that reads φ only through :meth:`losses`, :meth:`first_order_grads` and
        :meth:`displacement` (FOMAML, Reptile) lets the head's B stay factored as MAML's does
        (:meth:`factors_head`); φ is then never written to the model."""
        rule = rule or self.update_rule()
        keep_grads = self.learning_rates and not second_order
        factored = (second_order or factor_head) and self.factors_head(tasks.size, second_order, rule)
        in_place = tasks.size == 1 and not second_order and not factored
        skip = self.head_b.index if factored else None  # B is held as LowRankB, never copied
        adapted = Adapted(None if in_place else self._start_weights(tasks.size, second_order, skip),
                          [] if keep_grads else None)
        if factored:
            adapted.head_b = LowRankB(self.inner_params[self.head_b.index])
            dense_rule = rule.subset([i for i in range(len(self.inner_names)) if i != self.head_b.index])
        for k, batch in enumerate(tasks.support):
            losses = self.losses(batch, None if in_place else adapted, double_backward=second_order)
            for m, ep, value in zip(metrics or [], tasks.episodes, losses.detach().tolist()):
                _record_inner_step(m, k, ep.support_batches[k], value)
            if factored:
                self._factored_step(adapted, losses.sum(), rule, dense_rule, k, graph=second_order)
                continue
            wrt = self.inner_params if in_place else list(adapted.weights.values())
            whole = in_place and len(self.inner_params) == len(self.params)
            grads = self.grad(losses.sum(), None if whole else wrt, create_graph=second_order)
            if keep_grads:
                adapted.inner_grads.append([g.detach() for g in grads])
            if second_order:
                adapted.weights = dict(zip(adapted.weights, rule.step(wrt, grads, k)))
            elif in_place:
                self.before_param_write()
                with torch.no_grad():
                    step_in_place(rule, _local(self.inner_params), _local(grads), k)
            else:
                with torch.no_grad():
                    new = rule.step(wrt, grads, k)
                adapted.weights = {n: w.requires_grad_() for n, w in zip(adapted.weights, new)}
        return adapted

    def factors_head(self, size: int, second_order: bool, rule=None) -> bool:
        """Whether :meth:`adapt` keeps the head's B factored for ``size`` tasks: an SGD rule with a rate
        per tensor (the step is then a scalar times Gᵀz), not first order with learned rates (their
        α-gradient needs each step's dense gradient), and :meth:`factored_tasks`."""
        rule = rule or self.update_rule()
        return (hasattr(rule, "rate") and (second_order or not self.learning_rates)
                and self.factored_tasks(size))

    def factored_tasks(self, size: int) -> bool:
        """Whether MAML's inner loop can keep the head's B factored for ``size`` tasks at once: one
        task whenever the inner scope holds the head's lora_B; several when the inner scope is exactly
        the head's lora_A and lora_B over prefix states that reach the head directly, so the tasks'
        target rows run together (:meth:`_task_rows_losses`). Not under FSDP2, whose sharded
        parameters are gathered by the modules' own hooks, which the swapped-in modules bypass."""
        if self.head_b is None or has_dtensors(self.params):
            return False
        return size == 1 or (self.head_b.a_index is not None and self.window is not None
                             and self.split_at == self.window.parts.num_layers)

    def _task_rows_losses(self, batch: Batch, adapted: "Adapted", double_backward: bool) -> torch.Tensor:
        """The losses ``[T]`` of T stacked tasks whose inner scope is the head's adapter (B factored):
        every task's rows in one forward, each task's rows through its own A and B. The layers below
        the head are not run (their states are ``inputs_embeds``), so the tasks' rows are independent
        and need no per-task call; the head runs at the target tokens only, task after task."""
        tasks, rows, length = batch["input_ids"].shape
        flat = {"input_ids": batch["input_ids"].reshape(tasks * rows, length),
                "labels": batch["labels"].reshape(tasks * rows, length),
                "inputs_embeds": batch["inputs_embeds"].reshape(tasks * rows, length, -1)}
        counts = (batch["labels"][..., 1:] != IGNORE_INDEX).sum((1, 2)).tolist()
        a = PerTaskLinear(adapted.weights[self.inner_names[self.head_b.a_index]])
        with installed(self.head_b, adapted.head_b, a, counts), self._context(double_backward), self._suffix(flat):
            logits, targets = logits_at_targets(self.model, flat)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        token_losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        sums = torch.stack([part.sum() for part in token_losses.split(counts)])
        return sums / torch.tensor(counts, device=sums.device).clamp(min=1)

    def _factored_step(self, adapted: "Adapted", loss: torch.Tensor, rule, dense_rule, k: int, graph: bool) -> None:
        """One inner step with the head's B factored: the dense inner tensors by ``dense_rule``; B by
        the gradient with respect to its last output (the logits' LoRA term). ``graph``: second order
        (φ a function of θ); otherwise the step's terms are constants, as in first order."""
        low_rank = adapted.head_b
        wrt = list(adapted.weights.values())
        grads = self.grad(loss, wrt + [low_rank.last_output], create_graph=graph)
        if graph:
            adapted.weights = dict(zip(adapted.weights, dense_rule.step(wrt, grads[:-1], k)))
        else:
            with torch.no_grad():
                new = dense_rule.step(wrt, grads[:-1], k)
            adapted.weights = {n: w.requires_grad_() for n, w in zip(adapted.weights, new)}
        adapted.head_b = low_rank.stepped(grads[-1], rule.rate(self.head_b.index, k), detach=not graph)

    def _start_weights(self, size: int, graph: bool, skip: int | None = None) -> dict[str, torch.Tensor]:
        """θ's inner scope (less the tensor at ``skip``) broadcast to ``size`` tasks: a view of θ in
        the graph (MAML: the backward pass sums the tasks' paths into θ), or a detached leaf per step
        (first order). One task's weights are not stacked: θ itself starts its graph, as a plain
        functional call would."""
        named = [(n, p) for j, (n, p) in enumerate(zip(self.inner_names, self.inner_params)) if j != skip]
        if size == 1:
            return {n: p if graph else p.detach().clone().requires_grad_() for n, p in named}
        if graph:
            return {n: p.unsqueeze(0).expand(size, *p.shape) for n, p in named}
        return {n: p.detach().unsqueeze(0).expand(size, *p.shape).requires_grad_() for n, p in named}

    def first_order_grads(self, loss: torch.Tensor, adapted: "Adapted") -> tuple[list, list]:
        """The gradient of a (summed) query ``loss`` at the adapted weights, aligned with θ (the inner
        scope's at φ, summed over the tasks; the other meta-parameters' at θ), and the inner scope's
        own, per task as φ is stored."""
        if adapted.weights is None:  # in place: the model holds φ
            grads = self.grad(loss)
            return grads, self.inner_part(grads)
        inner = set(self.inner_index)
        others = [i for i in range(len(self.params)) if i not in inner]
        names = list(adapted.weights)  # the inner scope's, less a factored B
        wrt = [adapted.weights[n] for n in names] + [self.params[i] for i in others]
        if adapted.head_b is not None:
            wrt.append(adapted.head_b.last_output)
        grads = self.grad(loss, wrt)
        full: list = [None] * len(self.params)
        inner_grads: list = [None] * len(self.inner_index)
        for name, g in zip(names, grads):
            j = self.inner_names.index(name)
            inner_grads[j] = g
            full[self.inner_index[j]] = g.sum(0) if g.dim() > self.inner_params[j].dim() else g
        for i, g in zip(others, grads[len(names):]):
            full[i] = g
        if adapted.head_b is not None:  # summed over the tasks already; no per-task B (no learned rates here)
            full[self.inner_index[self.head_b.index]] = adapted.head_b.weight_grad(grads[-1])
        return full, inner_grads

    @torch.no_grad()
    def displacement(self, adapted: "Adapted") -> list[torch.Tensor]:
        """Σ_t (θ − φ_t) over the inner scope (zero elsewhere: the inner loop did not move it)."""
        if adapted.weights is None:
            return [theta - p for theta, p in zip(self.inner_theta(), self.inner_params)]
        # Differences first: θ − φ is small next to θ, and subtracting per task keeps its rounding
        # relative to the difference.
        out = []
        for j, (p, name) in enumerate(zip(self.inner_params, self.inner_names)):
            if adapted.head_b is not None and j == self.head_b.index:
                out.append(adapted.head_b.displacement())
                continue
            phi = adapted.weights[name]
            out.append((p.unsqueeze(0) - phi).sum(0) if phi.dim() > p.dim() else p - phi)
        return out

    def inner_theta(self) -> list[torch.Tensor]:
        return [self.theta[i] for i in self.inner_index]

    @torch.no_grad()
    def record_losses(self, tasks: TaskBatch, metrics: list[TaskMetrics], attribute: str, losses: torch.Tensor,
                      count_tokens: bool = False) -> None:
        for value, m, ep in zip(losses.detach().tolist(), metrics, tasks.episodes):
            setattr(m, attribute, value)
            if count_tokens:
                m.tokens += _tokens(ep.query_batch)

    def start_metrics(self, tasks: TaskBatch, want_pre: bool) -> list[TaskMetrics]:
        """Fresh metrics for each task, with its query loss at θ when asked (one forward for all)."""
        metrics = [TaskMetrics(ep.task) for ep in tasks.episodes]
        if want_pre and tasks.query is not None:
            with torch.no_grad():
                self.record_losses(tasks, metrics, "query_loss_pre", self.losses(tasks.query))
        return metrics


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
