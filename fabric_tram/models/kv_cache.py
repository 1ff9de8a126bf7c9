"""The keys and values a decoder has computed so far, so that generation feeds one new token per step instead
of the whole sequence again (quadratic work becomes linear)."""

from __future__ import annotations

import torch


class LayerCache:
    """One attention layer's keys and values, (batch, heads, positions, head_dim), grown along the positions."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys and values; return all of them."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class KVCache:
    def __init__(self, n_layer: int):
        self.layers = [LayerCache() for _ in range(n_layer)]

    @property
    def length(self) -> int:
        """Positions already seen: the new tokens' positions start here."""
        return self.layers[0].length


def cached_attention(q, k, v, cache: LayerCache | None, dropout_p: float, **kwargs) -> torch.Tensor:
    """Causal scaled-dot-product attention of the new positions ``q`` over the cached ones and their own. A
    prompt (nothing cached yet) is causal within itself; after it, one position at a time sees every position."""
    causal = True
    if cache is not None:
        first = cache.length == 0
        if not first and q.shape[2] != 1:
            raise ValueError("after the prompt, a KV cache takes one new position per step")
        k, v = cache.extend(k, v)
        causal = first
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, **kwargs)
