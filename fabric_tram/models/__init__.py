"""Models: each registered with ``@register_model``; ``build_model`` turns a config section into a module."""

from fabric_tram.models import encoder, gpt2, llama, vit  # noqa: F401  (register each family)
from fabric_tram.registry import MODELS


def build_model(section):
    """Build the model named by ``section.name``; classes with ``from_config`` handle pretrained weights."""
    target = MODELS.get(section.name).target
    return target.from_config(section) if hasattr(target, "from_config") else target(section)
