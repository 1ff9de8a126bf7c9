"""A plugin for the two-node test (tests/test_nodes.py): on the node whose environment sets FAIL_AT_STEP, the
training step of that optimizer step raises, as a node that fails mid-run would."""

import os

from fabric_tram.engine import trainer

FAIL_AT_STEP = int(os.environ.get("FAIL_AT_STEP", "0"))
if FAIL_AT_STEP:
    real_step = trainer.training_step

    def failing_step(run, batches, step, *args, **kwargs):
        if step == FAIL_AT_STEP:
            raise RuntimeError(f"planted failure at step {step} (tests/node_failure.py)")
        return real_step(run, batches, step, *args, **kwargs)

    trainer.training_step = failing_step
