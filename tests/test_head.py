"""The language-model head pads the vocabulary to a multiple of 64 on a GPU (models/head.py): the same logits and
gradients as the unpadded product, through a whole training step of each decoder family (float64)."""

import pytest
import torch

import fabric_tram.models.head as head
from fabric_tram.loss import cross_entropy_sum
from fabric_tram.models.gpt2 import GPT2, GPT2Config
from fabric_tram.models.llama import Llama, LlamaConfig

VOCAB = 101  # padded to 128: 27 zero rows


def model_of(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2(GPT2Config(preset="tiny", n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB)).double()
    return Llama(LlamaConfig(preset="tiny", vocab_size=VOCAB)).double()


def loss_and_gradients(family: str, multiple: int, monkeypatch) -> tuple:
    monkeypatch.setattr(head, "CPU_VOCAB_MULTIPLE", multiple)
    model = model_of(family)
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    logits = model(ids[:, :-1])
    out = cross_entropy_sum(logits, ids[:, 1:])
    out.loss_sum.backward()
    return logits, out.loss_sum, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_padded_head_gives_the_unpadded_logits_and_gradients(family, monkeypatch):
    plain_logits, plain_loss, plain_grads = loss_and_gradients(family, 1, monkeypatch)
    padded_logits, padded_loss, padded_grads = loss_and_gradients(family, 64, monkeypatch)
    assert plain_logits.stride(-2) == VOCAB and padded_logits.stride(-2) == 128  # the padded product did run
    assert padded_logits.shape == plain_logits.shape
    torch.testing.assert_close(padded_logits, plain_logits, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(padded_loss, plain_loss, rtol=1e-13, atol=1e-13)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(padded_grads[name], grad, rtol=1e-12, atol=1e-13, msg=name)


def test_a_vocabulary_already_aligned_is_not_copied():
    hidden, weight = torch.randn(2, 5, 8), torch.randn(128, 8)
    assert head.lm_logits(hidden, weight, multiple=64).is_contiguous()
