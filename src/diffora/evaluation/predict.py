"""Run a model over an evaluation set and score it.

Classification: arg-max of the logits; regression: the single logit; causal LM: the mean per-token negative
log-likelihood over scored tokens (labels != -100), reported as ``eval_loss`` and ``perplexity``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from ..method.parallel import model_device
from .metrics import compute_metrics


@torch.no_grad()
def evaluate_model(model: nn.Module, batches: Iterable[dict], kind: str, metrics: Sequence[str]) -> dict[str, float]:
    """Score ``model`` on ``batches`` (each a dict with ``labels``). The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    batches = ({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()} for batch in batches)
    try:
        if kind == "causal_lm":
            return _evaluate_lm(model, batches, metrics)
        outputs, labels = [], []
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits.float()
            outputs.append((logits[:, 0] if kind == "regression" else logits.argmax(dim=-1)).cpu())
            labels.append(batch["labels"].cpu())
        predictions = torch.cat(outputs)
        return compute_metrics(list(metrics), predictions, torch.cat(labels))
    finally:
        model.train(was_training)


def _evaluate_lm(model: nn.Module, batches: Iterable[dict], metrics: Sequence[str]) -> dict[str, float]:
    total_nll, total_tokens = 0.0, 0
    for batch in batches:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float()
        # next-token prediction: position t predicts token t+1
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        nll = nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total_nll += float(nll)
        total_tokens += int((shift_labels != -100).sum())
    mean_nll = total_nll / max(total_tokens, 1)
    result = {"eval_loss": mean_nll}
    result.update(compute_metrics([m for m in metrics if m == "perplexity"], [], [], mean_nll=mean_nll))
    return result
