"""The BERT/RoBERTa/XLM-R encoder family with a sentence(-pair) classification head, in one readable file.

Two variants of one architecture (post-LayerNorm blocks, GELU MLPs, learned absolute positions):
- ``roberta`` (RoBERTa, XLM-R): positions count from ``pad_token_id + 1`` over the non-padding tokens; one token
  type; the head reads the first token (``<s>``): dense → tanh → out_proj.
- ``bert`` (BERT, multilingual E5): positions 0, 1, 2, ...; two token types (segment A and B); a pooler
  (dense → tanh on ``[CLS]``) and a linear classifier.

Parameter names follow Hugging Face's ``*ForSequenceClassification`` (the ``roberta.``/``bert.`` prefix dropped
inside ``body``), so hub checkpoints load as they are: a masked-LM or bare-encoder checkpoint gets a new head
(the paper trains the classification head from scratch), a classification checkpoint keeps its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fabric_tram.contracts import Sizing
from fabric_tram.models.hub import build_pretrained, mismatches, refuse_conflicting_sizes
from fabric_tram.registry import register_model

PRESETS = {
    # tiny: the bundled nli-sample tokenizer's 255 ids (tokenizers/nli-sample), for smoke runs and tests
    "tiny": dict(variant="roberta", n_layer=2, n_head=4, n_embd=64, intermediate_size=128, vocab_size=255,
                 max_position_embeddings=130, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5),
    # FacebookAI/xlm-roberta-base and -large (config.json of the hub checkpoints)
    "xlm-roberta-base": dict(variant="roberta", n_layer=12, n_head=12, n_embd=768, intermediate_size=3072,
                             vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                             layer_norm_eps=1e-5),
    "xlm-roberta-large": dict(variant="roberta", n_layer=24, n_head=16, n_embd=1024, intermediate_size=4096,
                              vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                              layer_norm_eps=1e-5),
    # intfloat/multilingual-e5-small: a BERT with XLM-R's vocabulary
    "multilingual-e5-small": dict(variant="bert", n_layer=12, n_head=12, n_embd=384, intermediate_size=1536,
                                  vocab_size=250037, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0,
                                  layer_norm_eps=1e-12),
}  # fmt: skip
HF_IDS = {
    "xlm-roberta-base": "FacebookAI/xlm-roberta-base",
    "xlm-roberta-large": "FacebookAI/xlm-roberta-large",
    "multilingual-e5-small": "intfloat/multilingual-e5-small",
}
SIZE_KEYS = ("variant", "n_layer", "n_head", "n_embd", "intermediate_size", "vocab_size", "max_position_embeddings",
             "type_vocab_size", "pad_token_id", "layer_norm_eps")  # fmt: skip
HF_MODEL_TYPES = {"xlm-roberta": "roberta", "roberta": "roberta", "bert": "bert"}


@dataclass
class EncoderConfig:
    preset: str = "tiny"  # tiny | xlm-roberta-base | xlm-roberta-large | multilingual-e5-small
    pretrained: str | None = None  # a hub id, a local folder (config.json + safetensors), or null
    num_labels: int = 3  # NLI: entailment, neutral, contradiction
    dropout: float = 0.1  # hidden and attention-probability dropout (the checkpoints' own value)
    new_head: bool = False  # True: ignore a classification head found in the checkpoint, start a new one
    # the preset's sizes unless set (a checkpoint's config.json wins when loading)
    variant: str | None = None  # roberta | bert
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    type_vocab_size: int | None = None
    pad_token_id: int | None = None
    layer_norm_eps: float | None = None
    revision: str | None = None

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(
                f"model.preset={self.preset!r} is not an encoder preset; valid presets: {', '.join(PRESETS)}"
            )
        s = self.sizes()
        if s["variant"] not in ("roberta", "bert"):
            raise ValueError(f"model.variant must be roberta or bert, got {s['variant']!r}")
        if s["n_embd"] % s["n_head"]:
            raise ValueError(f"model.n_embd={s['n_embd']} must be divisible by n_head={s['n_head']}")
        if self.num_labels < 2:
            raise ValueError(f"model.num_labels must be >= 2, got {self.num_labels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

    def sizes(self) -> dict:
        sizes = dict(PRESETS[self.preset])
        sizes.update({k: getattr(self, k) for k in SIZE_KEYS if getattr(self, k) is not None})
        return sizes


class SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.query, self.key, self.value = (nn.Linear(n_embd, n_embd) for _ in range(3))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            for proj in (self.query, self.key, self.value)
        )
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)  # every token sees every other
        return y.transpose(1, 2).reshape(B, T, C)


class Projection(nn.Module):
    """dense → dropout → LayerNorm(· + residual): how BERT closes its attention and its MLP (post-LN)."""

    def __init__(self, n_in: int, n_out: int, eps: float, dropout: float):
        super().__init__()
        self.dense, self.LayerNorm, self.dropout = nn.Linear(n_in, n_out), nn.LayerNorm(n_out, eps=eps), dropout

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.dropout(self.dense(x), self.dropout, self.training) + residual)


class Attention(nn.Module):
    def __init__(self, s: dict, dropout: float):
        super().__init__()
        self.self = SelfAttention(s["n_embd"], s["n_head"], dropout)
        self.output = Projection(s["n_embd"], s["n_embd"], s["layer_norm_eps"], dropout)


class Intermediate(nn.Module):
    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(n_embd, hidden)


class EncoderLayer(nn.Module):
    def __init__(self, s: dict, dropout: float):
        super().__init__()
        self.attention = Attention(s, dropout)
        self.intermediate = Intermediate(s["n_embd"], s["intermediate_size"])
        self.output = Projection(s["intermediate_size"], s["n_embd"], s["layer_norm_eps"], dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, keep), x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class Embeddings(nn.Module):
    def __init__(self, s: dict):
        super().__init__()
        self.word_embeddings = nn.Embedding(s["vocab_size"], s["n_embd"], padding_idx=s["pad_token_id"])
        self.position_embeddings = nn.Embedding(s["max_position_embeddings"], s["n_embd"])
        self.token_type_embeddings = nn.Embedding(s["type_vocab_size"], s["n_embd"])
        self.LayerNorm = nn.LayerNorm(s["n_embd"], eps=s["layer_norm_eps"])


class Layers(nn.Module):
    def __init__(self, s: dict, dropout: float):
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(s, dropout) for _ in range(s["n_layer"]))


class Pooler(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.dense = nn.Linear(n_embd, n_embd)


class Body(nn.Module):
    def __init__(self, s: dict, dropout: float):
        super().__init__()
        self.embeddings = Embeddings(s)
        self.encoder = Layers(s, dropout)
        if s["variant"] == "bert":
            self.pooler = Pooler(s["n_embd"])


class RobertaHead(nn.Module):
    def __init__(self, n_embd: int, num_labels: int):
        super().__init__()
        self.dense, self.out_proj = nn.Linear(n_embd, n_embd), nn.Linear(n_embd, num_labels)


@register_model(
    "encoder",
    config=EncoderConfig,
    description="BERT/RoBERTa/XLM-R encoder + sentence-pair classification head; presets tiny, xlm-roberta-*; HF",
)
class Encoder(nn.Module):
    """``forward(input_ids, attention_mask=None, token_type_ids=None, input_noise=None) -> logits (B, labels)``."""

    block_class = EncoderLayer  # FSDP wraps and activation checkpointing applies per block
    lora_target_modules = ("query", "value")  # peft's default for BERT and XLM-R
    activation_checkpointing = False

    @classmethod
    def sizing(cls) -> Sizing:
        """What the estimator sizes this family by without reading weights (contracts.py)."""
        return Sizing(PRESETS, HF_IDS, config_from_hf)

    def __init__(self, config: EncoderConfig):
        super().__init__()
        config.check()
        self.config = config
        s = self.sizes = config.sizes()
        self.body = Body(s, config.dropout)
        if s["variant"] == "roberta":
            self.classifier = RobertaHead(s["n_embd"], config.num_labels)
        else:
            self.classifier = nn.Linear(s["n_embd"], config.num_labels)
        for p in self.parameters():
            if not p.is_meta:
                nn.init.normal_(p, 0.0, 0.02) if p.dim() >= 2 else nn.init.zeros_(p)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm) and not m.weight.is_meta:
                nn.init.ones_(m.weight)

    @property
    def input_embedding(self) -> nn.Module:
        """The token-embedding lookup whose output input noise is added to (before positions and types are)."""
        return self.body.embeddings.word_embeddings

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: 2 per block weight + bidirectional attention (QK and AV over all positions);
        the head runs once per sequence, the lookups are no FLOPs."""
        s = self.sizes
        C, L = s["n_embd"], s["n_layer"]
        return 2.0 * L * (4 * C * C + 2 * C * s["intermediate_size"]) + 4.0 * L * seq_len * C

    def positions(self, input_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.sizes["variant"] == "bert":
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        # RoBERTa: real tokens count from pad + 1, padding sits at pad (so padding never shifts a position)
        keep = keep.long()
        return torch.cumsum(keep, dim=1) * keep + self.sizes["pad_token_id"]

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, input_noise=None) -> torch.Tensor:
        """Logits (B, num_labels) from the first token's final hidden state (``<s>``/``[CLS]``)."""
        return self.classify(self.hidden_states(input_ids, attention_mask, token_type_ids, input_noise)[:, 0])

    def hidden_states(self, input_ids, attention_mask=None, token_type_ids=None, input_noise=None) -> torch.Tensor:
        """The final hidden states (B, T, C). ``input_noise``: a function mapping the token embeddings to their
        noised version (the update rules that noise the inputs pass one), applied before position and token-type
        embeddings are added, as Hugging Face's ``inputs_embeds``."""
        keep = attention_mask.bool() if attention_mask is not None else input_ids != self.sizes["pad_token_id"]
        emb = self.body.embeddings
        x = emb.word_embeddings(input_ids)
        if input_noise is not None:
            x = input_noise(x)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = x + emb.position_embeddings(self.positions(input_ids, keep)) + emb.token_type_embeddings(types)
        x = F.dropout(emb.LayerNorm(x), self.config.dropout, self.training)
        mask = keep[:, None, None, :]  # (B, 1, 1, T): padding is never attended to
        for block in self.body.encoder.layer:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x

    def classify(self, first: torch.Tensor) -> torch.Tensor:
        """The head: logits from the first token's final hidden state."""
        drop = lambda t: F.dropout(t, self.config.dropout, self.training)  # noqa: E731
        if self.sizes["variant"] == "roberta":
            return self.classifier.out_proj(drop(torch.tanh(self.classifier.dense(drop(first)))))
        return self.classifier(drop(torch.tanh(self.body.pooler.dense(first))))

    # --------------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_config(cls, config: EncoderConfig) -> Encoder:
        """Build the model; with ``pretrained`` set, its sizes come from the checkpoint's config.json."""
        return build_pretrained(cls, config, HF_IDS, config_from_hf)

    def to_hf(self, labels: list[str] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """``config.json`` and the state dict of Hugging Face's ``XLMRobertaForSequenceClassification`` (the
        ``roberta`` variant) or ``BertForSequenceClassification`` (``bert``), with the label names."""
        s, bert = self.sizes, self.sizes["variant"] == "bert"
        prefix = "bert." if bert else "roberta."
        state = {(prefix + k[len("body.") :] if k.startswith("body.") else k): v for k, v in self.state_dict().items()}
        names = list(labels) if labels else [f"LABEL_{i}" for i in range(self.config.num_labels)]
        config = {
            "architectures": ["BertForSequenceClassification" if bert else "XLMRobertaForSequenceClassification"],
            "model_type": "bert" if bert else "xlm-roberta",
            "hidden_size": s["n_embd"],
            "num_hidden_layers": s["n_layer"],
            "num_attention_heads": s["n_head"],
            "intermediate_size": s["intermediate_size"],
            "vocab_size": s["vocab_size"],
            "max_position_embeddings": s["max_position_embeddings"],
            "type_vocab_size": s["type_vocab_size"],
            "pad_token_id": s["pad_token_id"],
            "layer_norm_eps": s["layer_norm_eps"],
            "hidden_act": "gelu",
            "position_embedding_type": "absolute",
            "hidden_dropout_prob": self.config.dropout,
            "attention_probs_dropout_prob": self.config.dropout,
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
            "problem_type": "single_label_classification",
        }
        return config, state

    def load_hf_state_dict(self, hf_state: dict) -> None:
        """Copy a Hugging Face encoder state dict into this model (masked-LM heads and position-id buffers left
        out); a checkpoint without a classification head or pooler (or ``new_head``) keeps this model's new ones."""
        ours = self.state_dict()
        converted = {}
        for key, value in hf_state.items():
            for prefix in ("roberta.", "bert.", ""):
                if key.startswith(prefix) and key[len(prefix) :].split(".")[0] in ("embeddings", "encoder", "pooler"):
                    converted["body." + key[len(prefix) :]] = value
                    break
            else:
                if key.startswith("classifier.") and not self.config.new_head:
                    converted[key] = value
        converted = {k: v for k, v in converted.items() if not k.endswith("position_ids")}
        # the head (BERT: pooler and classifier) is the checkpoint's where it has one, else new, as initialised
        for group in ("body.pooler.", "classifier."):
            if not any(k.startswith(group) for k in converted):
                converted.update({k: v for k, v in ours.items() if k.startswith(group)})
        problems = mismatches(ours, converted)
        if problems:
            hint = (
                " (a classification head for another label count: model.new_head=true)"
                if any(p.startswith("shape") and "classifier" in p for p in problems)
                else ""
            )
            raise ValueError(
                f"checkpoint does not match this encoder ({'; '.join(problems)}){hint}. Pick the preset/config that "
                "matches the checkpoint (with model.pretrained set, the sizes come from its config.json)"
            )
        self.load_state_dict(converted, strict=True)


def config_from_hf(config: EncoderConfig, hf: dict) -> EncoderConfig:
    """Our config with the sizes of a Hugging Face ``config.json`` (XLM-R, RoBERTa or BERT). A preset other than
    the default ``tiny``, or sizes set explicitly, must agree with the checkpoint."""
    variant = HF_MODEL_TYPES.get(hf.get("model_type"))
    if variant is None:
        raise ValueError(
            f"the checkpoint's config.json has model_type={hf.get('model_type')!r}, not an encoder of this family "
            f"({', '.join(HF_MODEL_TYPES)}); use the model family that matches it (fabric-tram list shows them)"
        )
    checkpoint = dict(
        variant=variant,
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        pad_token_id=hf.get("pad_token_id", 1 if variant == "roberta" else 0),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
    )
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"the checkpoint uses hidden_act={hf.get('hidden_act')!r}, "
            f"position_embedding_type={hf.get('position_embedding_type')!r}; this encoder implements gelu with "
            "absolute positions only"
        )
    refuse_conflicting_sizes(config, PRESETS, SIZE_KEYS, checkpoint)
    return replace(config, **checkpoint)
