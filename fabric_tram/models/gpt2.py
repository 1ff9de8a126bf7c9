"""GPT-2 in the spirit of nanoGPT: SDPA attention, tied embeddings, Hugging Face checkpoints by name.

Parameter names follow Hugging Face's GPT-2 (``transformer.h.0.attn.c_attn.weight``, ...) with ``nn.Linear``
weights (HF stores Conv1D weights transposed; loading transposes them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fabric_tram.contracts import Sizing
from fabric_tram.models.head import lm_logits
from fabric_tram.models.hub import build_pretrained
from fabric_tram.models.kv_cache import KVCache, LayerCache, cached_attention
from fabric_tram.registry import register_model

PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=128),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}
HF_IDS = {"gpt2": "gpt2", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large", "gpt2-xl": "gpt2-xl"}


@dataclass
class GPT2Config:
    preset: str = "tiny"  # tiny | gpt2 | gpt2-medium | gpt2-large | gpt2-xl
    pretrained: str | None = None  # a hub id ("gpt2"), a local folder (config.json + model.safetensors), or null
    n_layer: int | None = None  # the preset's sizes unless set (ignored when loading a checkpoint)
    n_head: int | None = None
    n_embd: int | None = None
    n_positions: int | None = None  # 1024 (128 for tiny) unless set
    vocab_size: int = 50257
    dropout: float = 0.0  # HF GPT-2 uses 0.1 (resid, embd, attn)
    layer_norm_epsilon: float = 1e-5
    revision: str | None = None  # hub revision for `pretrained`

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset={self.preset!r} is not a GPT-2 preset; valid presets: {', '.join(PRESETS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

    def sizes(self) -> dict:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {self.preset!r}; valid presets: {', '.join(PRESETS)}")
        sizes = {"n_positions": 1024, **PRESETS[self.preset]}
        for key in ("n_layer", "n_head", "n_embd", "n_positions"):
            if getattr(self, key) is not None:
                sizes[key] = getattr(self, key)
        return sizes


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = cached_attention(q, k, v, cache, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, vocab_size, n_positions, n_layer, n_head, n_embd, dropout, eps):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(n_embd, n_head, dropout, eps) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=eps)


@register_model(
    "gpt2",
    config=GPT2Config,
    description="GPT-2 decoder (nanoGPT-style, SDPA, tied embeddings); presets tiny..gpt2-xl; loads HF checkpoints",
)
class GPT2(nn.Module):
    """GPT-2 language model. ``forward(input_ids, input_noise=None) -> logits``."""

    block_class = Block  # FSDP wraps and activation checkpointing applies per block
    lora_target_modules = ("c_attn",)  # peft's default for GPT-2
    activation_checkpointing = False
    # LoRA adapters in peft's layout: our names are Hugging Face's; its Conv1D stores weights transposed
    adapter_layout = {"strip": "", "fan_in_fan_out": True}

    @classmethod
    def sizing(cls) -> Sizing:
        """What the estimator sizes this family by without reading weights (contracts.py)."""
        return Sizing(PRESETS, HF_IDS, config_from_hf)

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        s = config.sizes()
        self.sizes = {**s, "vocab_size": config.vocab_size}  # every family's sizes are a dict (contracts.py)
        self.n_positions = s["n_positions"]
        self.transformer = Transformer(
            config.vocab_size,
            s["n_positions"],
            s["n_layer"],
            s["n_head"],
            s["n_embd"],
            config.dropout,
            config.layer_norm_epsilon,
        )
        self.lm_head = nn.Linear(s["n_embd"], config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2
        self.reset_parameters(s["n_layer"])

    @property
    def input_embedding(self) -> nn.Module:
        """The token-embedding lookup whose output input noise is added to."""
        return self.transformer.wte

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: 2 per weight (head included, lookups excluded) + causal attention (QK and AV)."""
        s = self.config.sizes()
        L, C = s["n_layer"], s["n_embd"]
        weights = L * 12 * C * C + self.config.vocab_size * C  # from sizes: a local FSDP shard would undercount
        return 2.0 * weights + 2.0 * L * seq_len * C

    def activation_elements_per_token(self) -> float:
        """Values one block keeps for its backward, per token: 17·C (Korthikanti et al. 2022's 34·s·b·h bytes at
        16-bit, without the attention scores that fused attention does not store)."""
        return 17.0 * self.config.sizes()["n_embd"]

    def reset_parameters(self, n_layer: int) -> None:
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def forward(self, input_ids: torch.Tensor, input_noise=None, cache: KVCache | None = None) -> torch.Tensor:
        return lm_logits(self.hidden_states(input_ids, input_noise, cache), self.lm_head.weight)

    def new_cache(self) -> KVCache:
        """An empty KV cache for generation (``forward(ids, cache=...)`` then feeds one new token at a time)."""
        return KVCache(self.config.sizes()["n_layer"])

    @property
    def max_positions(self) -> int:
        return self.n_positions

    def hidden_states(self, input_ids: torch.Tensor, input_noise=None, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C), after the last LayerNorm. ``input_noise``: a function mapping the token
        embeddings to their noised version, applied before the position embeddings (the update rules that noise
        the inputs pass one; docs/design.md, "Model")."""
        B, T = input_ids.shape
        start = 0 if cache is None else cache.length  # the new tokens' first position
        if start + T > self.n_positions:
            raise ValueError(f"sequence length {start + T} exceeds the model's n_positions={self.n_positions}")
        tr = self.transformer
        tok = tr.wte(input_ids)
        if input_noise is not None:
            tok = input_noise(tok)
        x = tr.drop(tok + tr.wpe(torch.arange(start, start + T, device=input_ids.device)))
        for i, block in enumerate(tr.h):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, None if cache is None else cache.layers[i])
        return tr.ln_f(x)

    # --------------------------------------------------------------------------------- checkpoints

    def to_hf(self, labels: list[str] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """``config.json`` and the state dict of Hugging Face's ``GPT2LMHeadModel`` (Conv1D weights transposed
        back; the tied head is the embedding). ``labels`` is for classifiers."""
        s = self.config.sizes()
        state = {
            k: (v.t() if k.endswith(HF_CONV1D) else v).contiguous()
            for k, v in self.state_dict().items()
            if k != "lm_head.weight"
        }
        config = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "n_layer": s["n_layer"],
            "n_head": s["n_head"],
            "n_embd": s["n_embd"],
            "n_positions": s["n_positions"],
            "n_ctx": s["n_positions"],
            "vocab_size": self.config.vocab_size,
            "layer_norm_epsilon": self.config.layer_norm_epsilon,
            "resid_pdrop": self.config.dropout,
            "embd_pdrop": self.config.dropout,
            "attn_pdrop": self.config.dropout,
            "tie_word_embeddings": True,
        }
        return config, state

    @classmethod
    def from_config(cls, config: GPT2Config) -> GPT2:
        """Build the model; with ``pretrained`` set, its sizes come from the checkpoint's config.json."""
        return build_pretrained(cls, config, HF_IDS, config_from_hf)

    def load_hf_state_dict(self, hf_state: dict) -> None:
        """Copy a Hugging Face GPT-2 state dict (Conv1D layout) into this model, refusing any mismatch."""
        ours = self.state_dict()
        converted = {}
        for key, value in hf_state.items():
            key = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
            if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
                continue
            converted[key] = value.t() if key.endswith(HF_CONV1D) else value
        converted.setdefault("lm_head.weight", converted.get("transformer.wte.weight"))
        missing = sorted(set(ours) - set(converted))
        unexpected = sorted(set(converted) - set(ours))
        shapes = sorted(k for k in set(ours) & set(converted) if tuple(ours[k].shape) != tuple(converted[k].shape))
        if missing or unexpected or shapes:
            raise ValueError(
                "checkpoint does not match this GPT-2: "
                + "; ".join(
                    f"{what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                    for what, keys in (
                        ("missing keys", missing),
                        ("unexpected keys", unexpected),
                        (
                            "shape mismatch",
                            [f"{k} {tuple(converted[k].shape)} vs {tuple(ours[k].shape)}" for k in shapes],
                        ),
                    )
                    if keys
                )
                + ". Pick the preset/config that matches the checkpoint."
            )
        self.load_state_dict(converted, strict=True)


def config_from_hf(config: GPT2Config, hf: dict) -> GPT2Config:
    from dataclasses import replace

    return replace(
        config,
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        n_positions=hf.get("n_positions", hf.get("n_ctx", 1024)),
        vocab_size=hf["vocab_size"],
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
    )


HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
