"""The Vision Transformer (ViT-B/16 and a tiny preset) with a new classification head, in one readable file.

Pre-LayerNorm blocks, GELU MLPs, a learned [CLS] token and learned positions over 16×16 patches; the head reads
the final [CLS] state. Parameter names follow ``transformers`` ≥ 5's ``ViTForImageClassification``
(``vit.layers.0.attention.q_proj.weight``); checkpoints saved with the earlier names
(``vit.encoder.layer.0.attention.attention.query.weight``, as the hub's google/vit-base-patch16-224-in21k) are
renamed on load. A checkpoint without a classifier, or with one for another label count under ``new_head``,
gets a new head: the paper fine-tunes ImageNet weights with a dataset-specific head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fabric_tram.contracts import Sizing
from fabric_tram.models.hub import build_pretrained, mismatches, refuse_conflicting_sizes
from fabric_tram.registry import register_model

PRESETS = {
    "tiny": dict(image_size=32, patch_size=8, n_layer=2, n_head=4, n_embd=64, intermediate_size=128),
    # google/vit-base-patch16-224 (config.json of the hub checkpoint)
    "vit-b16": dict(image_size=224, patch_size=16, n_layer=12, n_head=12, n_embd=768, intermediate_size=3072),
}
HF_IDS = {"vit-b16": "google/vit-base-patch16-224"}
SIZE_KEYS = ("image_size", "patch_size", "n_layer", "n_head", "n_embd", "intermediate_size")
# transformers < 5 → ≥ 5 parameter names (inside vit.*)
RENAMES = (
    (r"^vit\.encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"vit.layers.\1.attention.q_proj."),
    (r"^vit\.encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"vit.layers.\1.attention.k_proj."),
    (r"^vit\.encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"vit.layers.\1.attention.v_proj."),
    (r"^vit\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"vit.layers.\1.attention.o_proj."),
    (r"^vit\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"vit.layers.\1.mlp.fc1."),
    (r"^vit\.encoder\.layer\.(\d+)\.output\.dense\.", r"vit.layers.\1.mlp.fc2."),
    (r"^vit\.encoder\.layer\.(\d+)\.", r"vit.layers.\1."),
)


@dataclass
class ViTConfig:
    preset: str = "tiny"  # tiny | vit-b16
    pretrained: str | None = None  # a hub id, a local folder (config.json + safetensors), or null
    num_labels: int = 100  # CIFAR-100
    dropout: float = 0.0  # hidden and attention dropout (ViT fine-tuning uses none)
    new_head: bool = False  # True: ignore a classifier found in the checkpoint, start a new one
    image_size: int | None = None  # the preset's sizes unless set (a checkpoint's config.json wins when loading)
    patch_size: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    intermediate_size: int | None = None
    layer_norm_eps: float = 1e-12
    revision: str | None = None

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset={self.preset!r} is not a ViT preset; valid presets: {', '.join(PRESETS)}")
        s = self.sizes()
        if s["n_embd"] % s["n_head"] or s["image_size"] % s["patch_size"]:
            raise ValueError(
                f"model.n_embd={s['n_embd']} must be divisible by n_head={s['n_head']} and image_size="
                f"{s['image_size']} by patch_size={s['patch_size']}"
            )
        if self.num_labels < 2:
            raise ValueError(f"model.num_labels must be >= 2, got {self.num_labels}")

    def sizes(self) -> dict:
        sizes = dict(PRESETS[self.preset])
        sizes.update({k: getattr(self, k) for k in SIZE_KEYS if getattr(self, k) is not None})
        return sizes


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(n_embd, n_embd) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(n_embd, hidden), nn.Linear(hidden, n_embd)


class ViTBlock(nn.Module):
    def __init__(self, s: dict, config: ViTConfig):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(s["n_embd"], eps=config.layer_norm_eps)
        self.attention = Attention(s["n_embd"], s["n_head"], config.dropout)
        self.layernorm_after = nn.LayerNorm(s["n_embd"], eps=config.layer_norm_eps)
        self.mlp = MLP(s["n_embd"], s["intermediate_size"])
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drop = lambda t: F.dropout(t, self.dropout, self.training)  # noqa: E731
        x = x + drop(self.attention(self.layernorm_before(x)))
        return x + drop(self.mlp.fc2(drop(F.gelu(self.mlp.fc1(self.layernorm_after(x))))))


class PatchEmbeddings(nn.Module):
    def __init__(self, s: dict):
        super().__init__()
        self.projection = nn.Conv2d(3, s["n_embd"], kernel_size=s["patch_size"], stride=s["patch_size"])


class Embeddings(nn.Module):
    def __init__(self, s: dict):
        super().__init__()
        n_patches = (s["image_size"] // s["patch_size"]) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, s["n_embd"]))
        self.position_embeddings = nn.Parameter(torch.zeros(1, n_patches + 1, s["n_embd"]))
        self.patch_embeddings = PatchEmbeddings(s)


class Body(nn.Module):
    def __init__(self, s: dict, config: ViTConfig):
        super().__init__()
        self.embeddings = Embeddings(s)
        self.layers = nn.ModuleList(ViTBlock(s, config) for _ in range(s["n_layer"]))
        self.layernorm = nn.LayerNorm(s["n_embd"], eps=config.layer_norm_eps)


@register_model("vit", config=ViTConfig, description="Vision Transformer (ViT-B/16, tiny) + new head; HF weights")
class ViT(nn.Module):
    """``forward(pixel_values (B, 3, H, W), input_noise=None) -> logits (B, num_labels)``."""

    block_class = ViTBlock  # FSDP wraps and activation checkpointing applies per block
    lora_target_modules = ("q_proj", "v_proj")  # the query and value projections, as for the text encoders
    activation_checkpointing = False

    @classmethod
    def sizing(cls) -> Sizing:
        """What the estimator sizes this family by without reading weights (contracts.py)."""
        return Sizing(PRESETS, HF_IDS, config_from_hf)

    def __init__(self, config: ViTConfig):
        super().__init__()
        config.check()
        self.config = config
        s = self.sizes = config.sizes()
        self.vit = Body(s, config)
        self.classifier = nn.Linear(s["n_embd"], config.num_labels)
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if "layernorm" in name:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            else:
                nn.init.trunc_normal_(p, std=0.02) if p.dim() >= 2 else nn.init.zeros_(p)

    @property
    def input_embedding(self) -> nn.Module:
        """The patch projection whose output input noise is added to (before [CLS] and positions)."""
        return self.vit.embeddings.patch_embeddings.projection

    def tokens_per_example(self) -> int:
        """The sequence the blocks see: [CLS] + one token per patch (197 for ViT-B/16 at 224 px)."""
        return 1 + (self.sizes["image_size"] // self.sizes["patch_size"]) ** 2

    def activation_elements_per_token(self) -> float:
        """Values one block keeps for its backward, per token (counted with saved-tensor hooks in the tests): both
        LayerNorms' inputs and outputs (4·C), q, k, v and the attention output (4·C), the MLP's GELU input and
        output (2·I). Fused attention stores no scores; dropout (none in ViT fine-tuning) would add its masks."""
        return 8.0 * self.sizes["n_embd"] + 2.0 * self.sizes["intermediate_size"]

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (patch or [CLS]): 2 per block weight + bidirectional attention."""
        s = self.sizes
        C, L = s["n_embd"], s["n_layer"]
        return 2.0 * L * (4 * C * C + 2 * C * s["intermediate_size"]) + 4.0 * L * seq_len * C

    def hidden_states(self, pixel_values: torch.Tensor, input_noise=None) -> torch.Tensor:
        """Final states (B, 1 + patches, C), LayerNorm applied. ``input_noise`` maps the patch embeddings
        (B, patches, C) to their noised version (the update rules that noise the inputs pass one)."""
        emb = self.vit.embeddings
        x = emb.patch_embeddings.projection(pixel_values).flatten(2).transpose(1, 2)
        if input_noise is not None:
            x = input_noise(x)
        x = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + emb.position_embeddings
        x = F.dropout(x, self.config.dropout, self.training)
        for block in self.vit.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.vit.layernorm(x)

    def forward(self, pixel_values: torch.Tensor, input_noise=None) -> torch.Tensor:
        return self.classifier(self.hidden_states(pixel_values, input_noise)[:, 0])

    # --------------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_config(cls, config: ViTConfig) -> ViT:
        """Build the model; with ``pretrained`` set, its sizes come from the checkpoint's config.json."""
        return build_pretrained(cls, config, HF_IDS, config_from_hf)

    def to_hf(self, labels: list[str] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """``config.json`` and the state dict of Hugging Face's ``ViTForImageClassification`` (transformers ≥ 5
        names, which are ours), with the label names."""
        s = self.sizes
        names = list(labels) if labels else [f"LABEL_{i}" for i in range(self.config.num_labels)]
        config = {
            "architectures": ["ViTForImageClassification"],
            "model_type": "vit",
            "image_size": s["image_size"],
            "patch_size": s["patch_size"],
            "num_channels": 3,
            "hidden_size": s["n_embd"],
            "num_hidden_layers": s["n_layer"],
            "num_attention_heads": s["n_head"],
            "intermediate_size": s["intermediate_size"],
            "hidden_act": "gelu",
            "qkv_bias": True,
            "layer_norm_eps": self.config.layer_norm_eps,
            "hidden_dropout_prob": self.config.dropout,
            "attention_probs_dropout_prob": self.config.dropout,
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
        }
        return config, dict(self.state_dict())

    def load_hf_state_dict(self, hf_state: dict) -> None:
        """Copy a Hugging Face ViT state dict (either naming) into this model; a checkpoint without a classifier,
        or ``new_head``, keeps this model's new one; the ImageNet pooler is left out."""
        ours = self.state_dict()
        converted = {}
        for key, value in hf_state.items():
            for pattern, replacement in RENAMES:
                key = re.sub(pattern, replacement, key)
            if key.startswith("vit.pooler.") or (key.startswith("classifier.") and self.config.new_head):
                continue
            converted[key] = value
        if not any(k.startswith("classifier.") for k in converted):
            converted.update({k: v for k, v in ours.items() if k.startswith("classifier.")})
        problems = mismatches(ours, converted)
        if problems:
            hint = " (a classifier for another label count: model.new_head=true)" if any(
                p.startswith("shape") and "classifier" in p for p in problems) else ""  # fmt: skip
            raise ValueError(
                f"checkpoint does not match this ViT ({'; '.join(problems)}){hint}. Pick the preset/config that "
                "matches the checkpoint (with model.pretrained set, the sizes come from its config.json)"
            )
        self.load_state_dict(converted, strict=True)


def config_from_hf(config: ViTConfig, hf: dict) -> ViTConfig:
    """Our config with the sizes of a Hugging Face ViT ``config.json``."""
    if hf.get("model_type") != "vit":
        raise ValueError(
            f"the checkpoint's config.json has model_type={hf.get('model_type')!r}, not a ViT; use the model "
            "family that matches it (fabric-tram list shows them)"
        )
    if hf.get("num_channels", 3) != 3 or not hf.get("qkv_bias", True) or hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError("this ViT implements 3-channel images, q/k/v biases and GELU; the checkpoint differs")
    checkpoint = dict(
        image_size=hf["image_size"],
        patch_size=hf["patch_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
    )
    refuse_conflicting_sizes(config, PRESETS, SIZE_KEYS, checkpoint)
    return replace(config, layer_norm_eps=hf.get("layer_norm_eps", config.layer_norm_eps), **checkpoint)
