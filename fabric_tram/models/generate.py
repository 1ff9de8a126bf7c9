"""Text from a decoder (GPT-2, the Llama family): the prompt once, then one token per step through a KV cache.

Greedy at temperature 0 (what ``transformers``' ``generate(do_sample=False)`` does); otherwise sampled from the
softmax at that temperature, restricted to the smallest set of tokens whose probability reaches ``top_p``, with a
generator seeded by ``seed`` (the same seed, the same text). Generation stops after an end-of-sequence token (a
model may have several: Llama 3's ``<|eot_id|>`` and ``<|end_of_text|>``), which is part of the output.
"""

from __future__ import annotations

import torch


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` with every token outside the nucleus set to 0: the most probable tokens, in order, up to and
    including the first whose cumulative probability reaches ``top_p`` (Holtzman et al. 2020; what transformers'
    ``top_p`` keeps). Not renormalised: sampling normalises."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # each token whose predecessors stay below top_p
    return torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = nucleus(torch.softmax(logits.double() / temperature, dim=-1), top_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int = 50, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, eos_ids: tuple[int, ...] = ()) -> list[int]:  # fmt: skip
    """The new token ids after ``prompt`` (up to ``max_new_tokens``, stopping after the first of ``eos_ids`` or at
    the model's context length). ``model``: a decoder with ``new_cache()``, ``max_positions`` and
    ``forward(ids, cache=)``."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    cache = model.new_cache()
    logits = model(torch.tensor([prompt], device=device), cache=cache)[0, -1]
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = next_token(logits, temperature, top_p, generator)
        out.append(token)
        if token in eos_ids or cache.length >= model.max_positions:
            break
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]
    model.train(was_training)
    return out
