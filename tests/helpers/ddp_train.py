"""Run by test_train.py under torchrun: train on RUN with 2 processes, each saving its weights."""

import sys
from pathlib import Path

from qlora_pipeline.pipeline import read_run_config
from qlora_pipeline.train import train

run_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
train(read_run_config(run_dir), run_dir, rank_state_dir=out_dir, log=lambda *a, **k: None)
