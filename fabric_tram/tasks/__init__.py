"""Tasks: each registered with ``@register_task``; a task builds datasets and computes ``loss(model, batch)``."""

from fabric_tram.loss import LossOutput, count_targets, cross_entropy_sum  # noqa: F401  (the tasks' loss contract)
from fabric_tram.tasks import (
    image_classification,  # noqa: F401,E402  (registers "image")
    language_modeling,  # noqa: F401  (registers "lm")
    pair_classification,  # noqa: F401,E402  (registers "nli")
)
