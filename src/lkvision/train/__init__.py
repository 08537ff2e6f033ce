"""lkvision.train: recipes, the training/eval engine, optimizer/schedule, EMA, checkpoints, DDP helpers.

``lkvision train`` / ``python -m lkvision.train`` / ``torchrun ... -m lkvision.train`` run :func:`train`.
"""

from .config import ConfigError, TrainConfig, list_recipes, load_recipe, make_config
from .engine import evaluate, train
from .stop import TrainingAborted, TrainingInterrupted

__all__ = ["train", "evaluate", "TrainConfig", "ConfigError", "make_config", "load_recipe", "list_recipes",
           "TrainingInterrupted", "TrainingAborted"]
