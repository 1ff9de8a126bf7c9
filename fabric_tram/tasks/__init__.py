"""Tasks: each registered with ``@register_task``; a task builds datasets and computes ``loss(model, batch)``."""
from fabric_tram.tasks import language_modeling  # noqa: F401  (registers "lm")
from fabric_tram.tasks.base import LossOutput, cross_entropy_sum  # noqa: F401
