"""Improved MeanFlow (iMF): the model, the objectives, the sampler and the training loop (see DESIGN.md)."""

from imf.checkpoint import load_model
from imf.config import get_preset
from imf.model import Cond, IMFNet, ModelConfig
from imf.objectives import make_objective
from imf.sampler import sample

__all__ = ["Cond", "IMFNet", "ModelConfig", "get_preset", "load_model", "make_objective", "sample"]
