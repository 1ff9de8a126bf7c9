"""fabric_tram: fine-tune pre-trained models with TRAM and its baselines on Lightning Fabric, exact at any scale."""

from fabric_tram.registry import (  # noqa: F401
    register_divergence,
    register_model,
    register_optimizer,
    register_schedule,
    register_task,
)

__version__ = "0.1.0"
