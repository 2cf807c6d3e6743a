"""Run the qlora-pipeline command and SIGKILL this process at a chosen moment (test_kill.py's helper).

    python tests/helpers/kill_harness.py KIND N run --run-dir RUN ...

KIND picks the moment, N its occurrence in this process (1 = the first):
  step        the N-th training micro-batch, after its forward pass and before its backward pass
              (with gradient accumulation an odd N lands between two micro-batches of one step)
  eval        the N-th validation micro-batch of an evaluation
  checkpoint  the N-th JSON file written inside a checkpoint's temporary folder (its
              loop_state.json or, last, its manifest.json: the weights are already on disk)
  none        never (the uninterrupted reference run)

The wrappers live here, not in the package: production code has no fault-injection switch.
"""

import os
import signal
import sys
from pathlib import Path

import torch

import qlora_pipeline.batches as batches_module
import qlora_pipeline.checkpoints as checkpoints_module
import qlora_pipeline.train as train_module
from qlora_pipeline.cli import main

kind, target, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
seen = 0


def count(event: str) -> None:
    global seen
    if event == kind:
        seen += 1
        if seen == target:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


token_losses = train_module.token_losses


def counted_token_losses(model, *args, **kwargs):
    result = token_losses(model, *args, **kwargs)
    count("step" if torch.is_grad_enabled() else "eval")
    return result


write_json_atomic = checkpoints_module.write_json_atomic


def counted_write_json_atomic(path, data):
    write_json_atomic(path, data)
    if Path(path).parent.name.startswith(".step-"):
        count("checkpoint")


train_module.token_losses = counted_token_losses  # the training step's
batches_module.token_losses = counted_token_losses  # evaluation's (batches.evaluate_loss)
checkpoints_module.write_json_atomic = counted_write_json_atomic  # save_checkpoint's
sys.exit(main(argv))
