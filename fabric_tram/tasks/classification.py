"""What every classification task shares: one label per example, the cross-entropy summed over examples (so
accumulation and data parallelism see one big batch), accuracy from the argmax, padding examples (-100) left out."""

from __future__ import annotations

import torch

from fabric_tram.loss import IGNORE_INDEX, LossOutput, count_targets, cross_entropy_sum


def correct_predictions(out: LossOutput, batch: dict) -> dict[str, torch.Tensor]:
    """A classifier's correct predictions in a batch (argmax of the logits), padding examples (-100) left out:
    what evaluation adds up besides the loss."""
    labels = batch["labels"]
    return {"correct": ((out.logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()}


def accuracy_metrics(loss_sum: float, count: float, correct: float = 0.0) -> dict[str, float]:
    """Mean loss and accuracy (%) of an evaluation split from its sums."""
    return {"loss": loss_sum / max(count, 1.0), "accuracy": 100.0 * correct / max(count, 1.0), "examples": count}


class ClassificationTask:
    headline_metric = "accuracy"  # what result tables report (higher is better)
    label_names: list[str] | None = None  # class names by label index (an exported model's id2label), if known

    def logits(self, model, batch: dict, **forward_kwargs) -> torch.Tensor:
        raise NotImplementedError  # a subclass feeds its batch's inputs to the model

    def loss(self, model, batch: dict, **forward_kwargs) -> LossOutput:
        # the shared loss: float32 at least, float64 for a float64 model (a `.float()` here made 64-true runs'
        # gradients float32-rounded), and its log-probabilities handed on to the divergences
        return cross_entropy_sum(self.logits(model, batch, **forward_kwargs), batch["labels"])

    @staticmethod
    def count_targets(batch: dict) -> torch.Tensor:
        return count_targets(batch["labels"], IGNORE_INDEX)

    eval_sums = staticmethod(correct_predictions)  # evaluation adds up correct predictions besides the loss
    metrics = staticmethod(accuracy_metrics)
