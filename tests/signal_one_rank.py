"""A plugin for the stop-signal test (tests/test_checkpoint.py): the process of global rank SIGNAL_RANK sends itself
SIGTERM during optimizer step SIGNAL_AT_STEP, as a scheduler that reaches one node first would."""

import os
import signal

from fabric_tram.engine import trainer

SIGNAL_AT_STEP = int(os.environ.get("SIGNAL_AT_STEP", "0"))
if SIGNAL_AT_STEP and os.environ.get("RANK") == os.environ.get("SIGNAL_RANK", "1"):
    real_step = trainer.training_step

    def signalled_step(run, batches, step, *args, **kwargs):
        if step == SIGNAL_AT_STEP:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(run, batches, step, *args, **kwargs)

    trainer.training_step = signalled_step
