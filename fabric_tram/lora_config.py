"""``model.lora``: the LoRA section every model section carries (the config layer adds it; models/lora.py applies
it). Plain data and its checks, a leaf below the config layer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoraConfig:
    """``model.lora``: low-rank adapters (LoRA, through peft) on the named linear layers of any model; the rest of
    the model is frozen and every update rule acts on the trainable parameters only (docs/algorithms.md)."""

    r: int = 8  # rank of each adapter: ΔW = (alpha / r) · B A, A: r × in, B: out × r (B starts at zero)
    alpha: float = 16.0  # scale numerator (peft's lora_alpha)
    dropout: float = 0.0  # dropout on the adapter's input (peft's lora_dropout)
    target_modules: list = field(default_factory=list)  # module names (last dotted part), e.g. [q_proj, v_proj];
    # empty: peft's default for the architecture (q_proj, v_proj for Llama; c_attn for GPT-2; query, value for BERT)
    modules_to_save: list = field(default_factory=list)  # modules trained in full beside the adapters (a new head)

    def check(self) -> None:
        if self.r < 1:
            raise ValueError(f"model.lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
