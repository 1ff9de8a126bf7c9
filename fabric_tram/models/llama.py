"""The Llama decoder family (Llama, SmolLM2, Qwen2) in one readable file: RMSNorm, rotary position embeddings,
grouped-query attention through SDPA, SwiGLU MLPs, optionally tied embeddings and (Qwen2) attention biases.

Parameter names follow Hugging Face's ``LlamaForCausalLM``/``Qwen2ForCausalLM`` (``model.layers.0.self_attn.q_proj
.weight``, ...), so their safetensors checkpoints load as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fabric_tram.contracts import Sizing
from fabric_tram.models.head import lm_logits
from fabric_tram.models.hub import build_pretrained, mismatches, refuse_conflicting_sizes
from fabric_tram.models.kv_cache import KVCache, LayerCache, cached_attention
from fabric_tram.registry import register_model

PRESETS = {
    "tiny": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128, vocab_size=50257),
    # HuggingFaceTB/SmolLM2-135M and -360M (config.json of the hub checkpoints)
    "smollm2-135m": dict(
        n_layer=30,
        n_head=9,
        n_kv_head=3,
        n_embd=576,
        intermediate_size=1536,
        vocab_size=49152,
        rope_theta=100000.0,
        max_position_embeddings=8192,
    ),  # fmt: skip
    "smollm2-360m": dict(
        n_layer=32,
        n_head=15,
        n_kv_head=5,
        n_embd=960,
        intermediate_size=2560,
        vocab_size=49152,
        rope_theta=100000.0,
        max_position_embeddings=8192,
    ),  # fmt: skip
    # meta-llama/Llama-3.2-1B: Llama 3's rotary frequencies stretched for a 128k context
    "llama-3.2-1b": dict(
        n_layer=16,
        n_head=32,
        n_kv_head=8,
        n_embd=2048,
        intermediate_size=8192,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),  # fmt: skip
}
HF_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
}
# sizes a preset fixes; set explicitly in the config they win over the preset
SIZE_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "vocab_size", "rope_scaling")
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig:
    preset: str = "tiny"  # tiny | smollm2-135m | smollm2-360m | llama-3.2-1b
    pretrained: str | None = None  # a hub id, a local folder (config.json + safetensors), or null
    n_layer: int | None = None  # the preset's sizes unless set (a checkpoint's config.json wins when loading)
    n_head: int | None = None
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); n_head: plain multi-head
    n_embd: int | None = None
    intermediate_size: int | None = None  # SwiGLU width
    vocab_size: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    # Llama 3's frequency scaling, as in its config.json: {rope_type: llama3, factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings}; null: plain rotary embeddings (the preset's unless set)
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2: biases on q, k and v
    dropout: float = 0.0  # on attention probabilities (Llama checkpoints use none)
    revision: str | None = None

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset={self.preset!r} is not a Llama preset; valid presets: {', '.join(PRESETS)}")
        s = self.sizes()
        if s["n_embd"] % s["n_head"] or s["n_head"] % s["n_kv_head"]:
            raise ValueError(
                f"model.n_embd={s['n_embd']} must be divisible by n_head={s['n_head']}, and n_head by "
                f"n_kv_head={s['n_kv_head']} (grouped-query attention shares each key/value head by a group)"
            )
        scaling = s["rope_scaling"]
        if scaling is not None:
            missing = [k for k in LLAMA3_SCALING_KEYS if k not in scaling]
            if scaling.get("rope_type", scaling.get("type")) != "llama3" or missing:
                raise ValueError(
                    f"model.rope_scaling={scaling} is not supported: only Llama 3's "
                    f"{{rope_type: llama3, {', '.join(LLAMA3_SCALING_KEYS)}}} (missing: {missing or 'none'}); "
                    "linear, dynamic and YaRN scaling are not implemented"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

    def sizes(self) -> dict:
        sizes = {"rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings}
        sizes.update({"rope_scaling": None, **PRESETS[self.preset]})
        for key in SIZE_KEYS:
            if getattr(self, key) is not None:
                sizes[key] = getattr(self, key)
        return sizes


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalised in float32 (as the reference), then cast back: bf16 sums of squares lose too much
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3's context extension: wavelengths longer than the original context / low_freq_factor are slowed by
    ``factor``; shorter than original context / high_freq_factor kept; those between interpolated smoothly."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    smooth = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # 0: long waves, 1: short waves
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device, dtype, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position × frequency, the frequencies repeated for both halves (Hugging Face's layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # rotate each (first half, second half) pair of channels by its position's angle
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, bias: bool, dropout: float):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.dropout = n_head, n_kv_head, n_embd // n_head, dropout
        self.q_proj = nn.Linear(n_embd, n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_head * self.head_dim, n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = cached_attention(q, k, v, cache, dropout_p=self.dropout if self.training else 0.0, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, s: dict, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(s["n_embd"], config.rms_norm_eps)
        self.self_attn = Attention(s["n_embd"], s["n_head"], s["n_kv_head"], config.attention_bias, config.dropout)
        self.post_attention_layernorm = RMSNorm(s["n_embd"], config.rms_norm_eps)
        self.mlp = SwiGLU(s["n_embd"], s["intermediate_size"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, s: dict, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(s["vocab_size"], s["n_embd"])
        self.layers = nn.ModuleList(LlamaBlock(s, config) for _ in range(s["n_layer"]))
        self.norm = RMSNorm(s["n_embd"], config.rms_norm_eps)


@register_model(
    "llama",
    config=LlamaConfig,
    description="Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU; Qwen2 biases); presets tiny, smollm2-*; HF weights",
)
class Llama(nn.Module):
    """A Llama-architecture language model. ``forward(input_ids, input_noise=None) -> logits``."""

    block_class = LlamaBlock  # FSDP wraps and activation checkpointing applies per block
    lora_target_modules = ("q_proj", "v_proj")  # peft's default for Llama, Mistral, Qwen2
    activation_checkpointing = False
    adapter_layout = {"strip": "", "fan_in_fan_out": False}  # LoRA in peft's layout: our names are HF's

    @classmethod
    def sizing(cls) -> Sizing:
        """What the estimator sizes this family by without reading weights (contracts.py)."""
        return Sizing(PRESETS, HF_IDS, config_from_hf)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        config.check()
        self.config = config
        s = self.sizes = config.sizes()
        self.model = LlamaBody(s, config)
        self.lm_head = nn.Linear(s["n_embd"], s["vocab_size"], bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    @property
    def input_embedding(self) -> nn.Module:
        """The token-embedding lookup whose output input noise is added to."""
        return self.model.embed_tokens

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: 2 per weight (head included, lookups excluded; k and v are n_kv_head wide)
        + causal attention (QK and AV over n_head query heads)."""
        s = self.sizes
        C, kv = s["n_embd"], s["n_kv_head"] * (s["n_embd"] // s["n_head"])
        per_layer = 2 * C * C + 2 * C * kv + 3 * C * s["intermediate_size"]
        return 2.0 * (s["n_layer"] * per_layer + s["vocab_size"] * C) + 2.0 * s["n_layer"] * seq_len * C

    def activation_elements_per_token(self) -> float:
        """Values one block keeps for its backward, per token (counted with saved-tensor hooks in the tests): each
        RMSNorm's input and normalised value (4·C), the projections' inputs (2·C), the rotated q, k and v and the
        attention output (2·C + 2·kv), SwiGLU's gate, up, SiLU(gate) and product (4·I); kv = n_kv_head·head_dim,
        I = intermediate_size. Fused attention stores no scores; per-token statistics are left out."""
        s = self.sizes
        C, kv = s["n_embd"], s["n_kv_head"] * (s["n_embd"] // s["n_head"])
        return 8.0 * C + 2.0 * kv + 4.0 * s["intermediate_size"]

    def forward(self, input_ids: torch.Tensor, input_noise=None, cache: KVCache | None = None) -> torch.Tensor:
        return lm_logits(self.hidden_states(input_ids, input_noise, cache), self.lm_head.weight)

    def new_cache(self) -> KVCache:
        """An empty KV cache for generation (``forward(ids, cache=...)`` then feeds one new token at a time)."""
        return KVCache(self.sizes["n_layer"])

    @property
    def max_positions(self) -> int:
        return self.sizes["max_position_embeddings"]

    def hidden_states(self, input_ids: torch.Tensor, input_noise=None, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C), after the last RMSNorm. ``input_noise``: a function mapping the token
        embeddings to their noised version (the update rules that noise the inputs pass one). Rotary embeddings
        have no table: any length runs."""
        x = self.model.embed_tokens(input_ids)
        if input_noise is not None:
            x = input_noise(x)
        s = self.sizes
        head_dim = s["n_embd"] // s["n_head"]
        start = 0 if cache is None else cache.length  # the new tokens' first position
        end = start + input_ids.shape[1]
        cos, sin = rotary_cos_sin(end, head_dim, s["rope_theta"], x.device, x.dtype, s["rope_scaling"])
        cos, sin = cos[start:end], sin[start:end]
        for i, block in enumerate(self.model.layers):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, None if cache is None else cache.layers[i])
        return self.model.norm(x)

    # --------------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_config(cls, config: LlamaConfig) -> Llama:
        """Build the model; with ``pretrained`` set, its sizes come from the checkpoint's config.json."""
        return build_pretrained(cls, config, HF_IDS, config_from_hf)

    def to_hf(self, labels: list[str] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """``config.json`` and the state dict of Hugging Face's ``LlamaForCausalLM``, or ``Qwen2ForCausalLM`` when
        q, k and v carry biases (Qwen2's layout; our names are theirs, so the weights go as they are)."""
        c, s = self.config, self.config.sizes()
        qwen2 = c.attention_bias
        state = {k: v for k, v in self.state_dict().items() if not (c.tie_word_embeddings and k == "lm_head.weight")}
        config = {
            "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen2 else "llama",
            "hidden_size": s["n_embd"],
            "intermediate_size": s["intermediate_size"],
            "num_hidden_layers": s["n_layer"],
            "num_attention_heads": s["n_head"],
            "num_key_value_heads": s["n_kv_head"],
            "vocab_size": s["vocab_size"],
            "max_position_embeddings": s["max_position_embeddings"],
            "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": s["rope_theta"],
            "rope_scaling": s.get("rope_scaling"),
            "tie_word_embeddings": c.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_dropout": c.dropout,
            **({} if qwen2 else {"attention_bias": False, "mlp_bias": False}),
        }
        return config, state

    def load_hf_state_dict(self, hf_state: dict) -> None:
        """Copy a Hugging Face Llama/Qwen2 state dict into this model, refusing any mismatch (names and shapes)."""
        ours = self.state_dict()
        converted = {k: v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}
        if self.config.tie_word_embeddings:
            converted.setdefault("lm_head.weight", converted.get("model.embed_tokens.weight"))
        problems = mismatches(ours, converted)
        if problems:
            raise ValueError(
                f"checkpoint does not match this Llama ({'; '.join(problems)}). Pick the preset/config that matches "
                "the checkpoint (with model.pretrained set, the sizes come from its config.json)"
            )
        self.load_state_dict(converted, strict=True)


HF_MODEL_TYPES = ("llama", "qwen2", "mistral")  # config.json model_type values with this architecture


def rope_from_hf(hf: dict, default_theta: float) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a config.json: transformers ≥ 5 writes ``rope_parameters`` (theta and
    scaling in one dict), earlier versions ``rope_theta`` and ``rope_scaling``."""
    params = hf.get("rope_parameters")
    if params is not None:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        return params.get("rope_theta", default_theta), (scaling if scaling.get("rope_type") != "default" else None)
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return hf.get("rope_theta", default_theta), scaling or None


def config_from_hf(config: LlamaConfig, hf: dict) -> LlamaConfig:
    """Our config with the sizes of a Hugging Face ``config.json`` (Llama, Qwen2, Mistral without sliding windows).
    A preset other than the default ``tiny``, or sizes set explicitly, must agree with the checkpoint."""
    if hf.get("model_type") not in HF_MODEL_TYPES:
        raise ValueError(
            f"the checkpoint's config.json has model_type={hf.get('model_type')!r}, not a Llama-architecture model "
            f"({', '.join(HF_MODEL_TYPES)}); use the model family that matches it (fabric-tram list shows them)"
        )
    n_head = hf["num_attention_heads"]
    rope_theta, rope_scaling = rope_from_hf(hf, config.rope_theta)
    checkpoint = dict(
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads", n_head),
        n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", config.max_position_embeddings),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
    )
    refuse_conflicting_sizes(config, PRESETS, SIZE_KEYS, checkpoint)
    return replace(
        config,
        preset="tiny",  # the checkpoint's sizes below replace every size the preset held
        rms_norm_eps=hf.get("rms_norm_eps", config.rms_norm_eps),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", hf.get("model_type") == "qwen2"),
        **checkpoint,
    )
