"""Independent reference implementations used by the gradient tests.

Written from the update rules with plain PyTorch (deep copies, ``.grad``, a hand-written
log-softmax loss), deliberately sharing no code with metasft's engine.
"""

import copy

import torch


def ref_loss(model, batch):
    """Token-mean next-token NLL, written out independently of metasft.losses."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / mask.sum()


def ref_adapt(model, support_batches, lr):
    """A deep copy of ``model`` after plain SGD steps on ``.grad`` of the trainable parameters."""
    adapted = copy.deepcopy(model)
    params = [p for p in adapted.parameters() if p.requires_grad]
    for batch in support_batches:
        adapted.zero_grad(set_to_none=True)
        ref_loss(adapted, batch).backward()
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad
    return adapted
