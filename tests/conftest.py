"""Shared pytest set-up: tiny models train faster on one thread, and W&B never goes online."""

from __future__ import annotations

import os

import torch

# Tests use tiny models; one intra-op thread is faster for them and keeps the two cores of CI
# machines free for the multi-process tests.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
