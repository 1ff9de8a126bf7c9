"""Models: each registered with ``@register_model``; ``build_model`` turns a config section into a module."""

from fabric_tram.models import encoder, gpt2, hf, llama, vit  # noqa: F401  (register each family)
from fabric_tram.registry import MODELS


def build_model(section):
    """Build the model named by ``section.name``; classes with ``from_config`` handle pretrained weights. With
    ``section.lora`` set, the model gets its adapters and everything else is frozen (models/lora.py)."""
    target = MODELS.get(section.name).target
    model = target.from_config(section) if hasattr(target, "from_config") else target(section)
    if getattr(section, "lora", None) is not None:
        from fabric_tram.models.lora import add_lora

        add_lora(model, section.lora)
    return model
