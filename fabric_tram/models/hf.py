"""Any Hugging Face transformers model, ``model.name=hf``: the engine trains it as it trains its own families.

The Auto class follows the task (``lm`` → ``AutoModelForCausalLM``, ``nli`` → ``AutoModelForSequenceClassification``,
``image`` → ``AutoModelForImageClassification``) unless ``model.head`` names one. What the engine needs from a model
it gets from the transformers model itself:

- the blocks FSDP2 shards, activation checkpointing recomputes and ``trainer.compile`` compiles: the classes the
  model lists in ``_no_split_modules`` whose instances sit in a ``ModuleList`` (its repeated layers; BERT also
  lists its embeddings, which are not a block), or the classes ``model.block_classes`` names;
- input noise (tram-x, tram-fisher, r3f): a forward hook on ``get_input_embeddings()`` adds z to the token (or
  patch) embeddings before positions are added, where our families add it;
- sizes for the estimator and MFU: parameter counts from the module, layers and width from its config.

Weights are read from safetensors only, as for our families; ``trust_remote_code`` is refused unless set.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fabric_tram.contracts import task_hf_head
from fabric_tram.models.hub import resolve_checkpoint_folder, safetensors_files
from fabric_tram.registry import TASKS, register_model

HEADS = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
}
# the positional inputs each head takes from the tasks (language_modeling, pair_classification, image_classification)
HEAD_INPUTS = {
    "causal-lm": ("input_ids",),
    "sequence-classification": ("input_ids", "attention_mask", "token_type_ids"),
    "image-classification": ("pixel_values",),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class HFConfig:
    pretrained: str = ""  # a hub id or a local folder (config.json + safetensors weights)
    head: str = "auto"  # auto (the task's) | causal-lm | sequence-classification | image-classification
    num_labels: int | None = None  # classifiers: the task's label count (nli: set from task.labels); null: checkpoint's
    new_head: bool = False  # True: a classification head of another size in the checkpoint is replaced by a new one
    init: str = "pretrained"  # pretrained: the checkpoint's weights | random: its architecture, newly initialised
    dtype: str = "float32"  # the weights' dtype as loaded (auto: the checkpoint's); trainer.precision then applies
    attn_implementation: str | None = None  # transformers' choice unless set: sdpa | eager | flash_attention_2
    block_classes: list = field(default_factory=list)  # class names of the blocks (default: _no_split_modules')
    trust_remote_code: bool = False  # run the checkpoint's own Python code (refused unless set)
    revision: str | None = None  # hub revision

    def check(self) -> None:
        if not self.pretrained:
            raise ValueError("model.pretrained is required for model.name=hf: a hub id or a local checkpoint folder")
        if self.head != "auto" and self.head not in HEADS:
            raise ValueError(f"model.head={self.head!r} is not one of auto, {', '.join(HEADS)}")
        if self.init not in ("pretrained", "random"):
            raise ValueError(f"model.init must be pretrained or random, got {self.init!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is not one of auto, {', '.join(DTYPES)}")

    def resolve_with(self, config) -> None:
        """``head: auto`` becomes the task's head; an nli classifier gets the task's label count."""
        task = config.task.name
        needed = task_hf_head(TASKS.get(task).target) if task in TASKS else None  # the task says which head
        if self.head == "auto":
            if needed is None:
                raise ValueError(
                    f"model.head=auto does not know task {task!r}: set model.head to one of {', '.join(HEADS)}"
                )
            self.head = needed
        elif needed is not None and self.head != needed:  # its outputs would not fit the task's targets
            raise ValueError(
                f"model.head={self.head} does not fit task {task!r}, whose loss reads a {needed} head's outputs: set "
                f"model.head={needed} (or auto)"
            )
        labels = getattr(config.task, "labels", None)
        if self.num_labels is None and self.head == "sequence-classification" and labels:
            self.num_labels = len(labels)


def transformers_module():
    try:
        import transformers
    except ImportError as err:
        raise ImportError("model.name=hf needs transformers: pip install -e '.[hf]'") from err
    return transformers


def checkpoint_config(config: HFConfig):
    """The checkpoint's folder and its transformers config (refusing remote code unless allowed)."""
    transformers = transformers_module()
    extra = ["*.py"] if config.trust_remote_code else []
    folder = resolve_checkpoint_folder(config.pretrained, config.revision, extra_patterns=extra)
    raw = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if raw.get("auto_map") and not config.trust_remote_code:
        raise ValueError(
            f"model.pretrained={config.pretrained!r} runs its own Python code (config.json has auto_map): read it, "
            "then set model.trust_remote_code=true to allow it"
        )
    kwargs = {"num_labels": config.num_labels} if config.num_labels is not None else {}
    hf_config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=config.trust_remote_code, **kwargs)
    hf_config.use_cache = False  # training: no key/value cache is built
    return folder, hf_config


def build_transformers_model(config: HFConfig) -> nn.Module:
    """The transformers model: the checkpoint's weights, or (``init=random``, or on the meta device, where the
    estimator and the export build models) its architecture alone, no weights read."""
    transformers = transformers_module()
    folder, hf_config = checkpoint_config(config)
    auto = getattr(transformers, HEADS[config.head])
    kwargs = {"trust_remote_code": config.trust_remote_code}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    dtype = config.dtype if config.dtype == "auto" else DTYPES[config.dtype]
    on_meta = torch.empty(()).device.type == "meta"
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a bar per load on every rank: the run's log says enough
    try:
        if config.init == "random" or on_meta:
            return auto.from_config(hf_config, dtype=torch.float32 if dtype == "auto" else dtype, **kwargs)
        safetensors_files(folder)  # pickled weights only: refused here, in one line, before transformers tries
        return auto.from_pretrained(
            folder, config=hf_config, dtype=dtype, use_safetensors=True, ignore_mismatched_sizes=config.new_head,
            **kwargs,
        )  # fmt: skip
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ValueError(
                f"{config.pretrained!r} (model_type {hf_config.model_type!r}) has no {HEADS[config.head]} "
                f"(model.head={config.head}): choose a checkpoint with that head, or the task whose head it has"
            ) from err
        raise
    except RuntimeError as err:
        if "size mismatch" in str(err):
            raise ValueError(f"{err}\nA classification head of another size: set model.new_head=true") from err
        raise
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def repeated_block_classes(model: nn.Module, names: list[str]) -> tuple[type, ...]:
    """The classes named ``names`` whose instances are items of a ``ModuleList``: the model's repeated blocks."""
    found = {}
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for item in module:
                if type(item).__name__ in names:
                    found[type(item).__name__] = type(item)
    return tuple(found.values())


def weight_elements(model: nn.Module) -> int:
    """Elements of the weights that multiply activations (linear, Conv1D, patch convolutions), each counted once:
    an embedding lookup is no multiplication, a tied head is the linear that reads the embedding."""
    seen, total = set(), 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Embedding) or not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            continue
        if id(weight) not in seen:
            seen.add(id(weight))
            total += weight.numel()
    return total


@dataclass
class HFCache:
    """transformers' key/value cache of a generation (None before the prompt) and the positions it holds."""

    past: object = None
    length: int = 0


@register_model(
    "hf",
    config=HFConfig,
    description="any Hugging Face transformers model (hub id or folder); the Auto class from the task; FSDP per block",
)
class HFModel(nn.Module):
    """A transformers model behind the engine's model contract: ``forward(*task inputs, input_noise=None) ->
    logits``; parameter names are the checkpoint's behind ``hf.``."""

    def __init__(self, config: HFConfig, model: nn.Module):
        super().__init__()
        self.config = config
        self.hf = model
        hf = model.config
        names = list(config.block_classes) or list(getattr(model, "_no_split_modules", None) or [])
        self.block_class = repeated_block_classes(model, names)
        self.no_blocks_reason = None
        if not self.block_class:
            self.no_blocks_reason = (
                f"the {type(model).__name__} of {config.pretrained!r} names no repeated block class "
                f"({'_no_split_modules=' + str(names) if names else 'no _no_split_modules'}), so FSDP2 cannot shard "
                "it per block, nor can activation checkpointing or trainer.compile apply per block: set "
                "model.block_classes to the class name of its layers (e.g. [MyDecoderLayer])"
            )
        accepted = inspect.signature(model.forward).parameters
        self.inputs = [name for name in HEAD_INPUTS[config.head] if name in accepted]
        text = getattr(hf, "get_text_config", lambda: hf)()
        self.sizes = {
            "n_layer": getattr(text, "num_hidden_layers", 0),
            "n_embd": getattr(text, "hidden_size", 0),
            "vocab_size": getattr(text, "vocab_size", 0) if config.head == "causal-lm" else 0,
            "image_size": getattr(hf, "image_size", None),
        }
        self.weights = weight_elements(model)
        self.causal = config.head == "causal-lm"
        self.num_labels = getattr(hf, "num_labels", None) if config.head != "causal-lm" else None

    @classmethod
    def from_config(cls, config: HFConfig) -> HFModel:
        return cls(config, build_transformers_model(config))

    @property
    def lora_target_modules(self) -> list[str] | None:
        """peft's default LoRA targets for this architecture (its per-model-type mapping), None where it has none."""
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        return DEFAULTS.get(self.hf.config.model_type)

    @property
    def input_embedding(self) -> nn.Module:
        """The token (or patch) embedding module whose output input noise is added to."""
        return self.hf.get_input_embeddings()

    @property
    def activation_checkpointing(self) -> bool:
        for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5, 4
            if hasattr(type(self.hf), name):
                return bool(getattr(self.hf, name))
        return False

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        # transformers' own per-layer checkpointing, non-reentrant as our families' (renamed in transformers 5)
        if not on:
            (getattr(self.hf, "activation_checkpointing_disable", None) or self.hf.gradient_checkpointing_disable)()
        elif hasattr(self.hf, "activation_checkpointing_enable"):
            self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, *inputs, input_noise=None, cache: HFCache | None = None) -> torch.Tensor:
        kwargs = {name: value for name, value in zip(HEAD_INPUTS[self.config.head], inputs, strict=False)}
        kwargs = {name: kwargs[name] for name in self.inputs if kwargs.get(name) is not None}
        if cache is not None:  # generation: the new positions only, after the cached ones
            out = self.hf(**kwargs, past_key_values=cache.past, use_cache=True)
            cache.past, cache.length = out.past_key_values, cache.length + kwargs["input_ids"].shape[1]
            return out.logits
        hook = None
        if input_noise is not None:  # z on the embedding lookup's output, before positions are added
            hook = self.input_embedding.register_forward_hook(lambda module, args, out: input_noise(out))
        try:
            return self.hf(**kwargs).logits
        finally:
            if hook is not None:
                hook.remove()

    @property
    def adapter_layout(self) -> dict:
        """LoRA adapters in peft's layout: the checkpoint's names behind ``hf.``; Conv1D layers (GPT-2) transposed."""
        conv1d = any(type(m).__name__ == "Conv1D" for n, m in self.hf.named_modules() if n.endswith(".base_layer"))
        return {"strip": "hf.", "fan_in_fan_out": conv1d}

    def forward_flops_per_token(self, seq_len: int) -> float:
        """2 per multiplying weight (the head included) + attention's QK and AV: causal 2·L·T·C, else 4·L·T·C.
        Counted from the module and its config; attention variants (sliding windows, GQA's smaller K/V) are
        not modelled."""
        L, C = self.sizes["n_layer"], self.sizes["n_embd"]
        return 2.0 * self.weights + (2.0 if self.causal else 4.0) * L * seq_len * C

    def to_hf(self, labels: list[str] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """The transformers config (with the label names of a classifier) and state dict, as ``save_pretrained``
        would write them."""
        config = self.hf.config.to_dict()
        config.pop("use_cache", None)
        if labels:
            config.update(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
        state, seen = {}, set()
        for name, tensor in self.hf.state_dict().items():
            where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if tensor.numel() and where in seen:  # a tied weight (lm_head = the embedding): transformers ties it again
                continue
            seen.add(where)
            state[name] = tensor
        return config, state

    # ------------------------------------------------------------------------------- generation (causal LMs)

    def new_cache(self) -> HFCache:
        """An empty cache for ``forward(ids, cache=)``: transformers' own key/value cache, grown a step at a time."""
        if not self.causal:
            raise ValueError(f"model.head={self.config.head}: only a causal-lm model generates text")
        return HFCache()

    @property
    def max_positions(self) -> int:
        text = getattr(self.hf.config, "get_text_config", lambda: self.hf.config)()
        return getattr(text, "max_position_embeddings", None) or 1 << 31  # no learned positions: no limit
