"""``fabric-tram``: train, run, evaluate, export, generate, sweep, report, estimate, bench, list, sharpness, cka,
convert-gguf.

fabric-tram train recipes/tiny_sample.py optimizer.lr=1e-3 trainer.max_steps=50
fabric-tram evaluate runs/tiny/checkpoints/step-00000050
fabric-tram list
fabric-tram sweep recipes/demo.py optimizer.name=adam,asam asam:optimizer.rho=0.1,0.5 trainer.seed=0,1
fabric run --devices 2 recipes/tiny_sample.py trainer.strategy=fsdp     # several processes
fabric-tram run --devices 2 recipes/tiny_sample.py trainer.strategy=fsdp # the same, its port checked first
"""

from fabric_tram.cli import sweep  # noqa: F401  (registers `fabric-tram sweep` on the group)
from fabric_tram.cli.commands import main, run_recipe, train_job
from fabric_tram.engine.reporting import reported_errors

__all__ = ["main", "reported_errors", "run_recipe", "train_job"]
