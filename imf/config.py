"""Presets (DESIGN 3.4): the model, the objective and the training knobs of each, as plain dataclasses."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from imf.checks import check_flags, check_int, check_real
from imf.model import ModelConfig

_OWNER = "TrainConfig"  # the checks' messages name it


@dataclass
class TrainConfig:
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    steps: int = 4000
    cooldown: float = 0.0  # fraction of `steps` at the end over which the lr decays linearly to 0
    seed: int = 0
    minutes: float | None = None  # wall-clock limit: training stops at `steps` or here, whichever comes first
    bf16: bool = False  # autocast the no-grad target evaluations to bf16; the JVP pass and the loss stay fp32
    cuda_graph: bool = False  # one CUDA graph replays each step's loss and backward (one GPU, imf or mf objective)
    pipelined: bool = False  # read each step's numbers after queuing the next step's loss and backward (Trainer)
    sample_every: int = 0  # steps between sample grids written during training (0: only at the end)
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """A ValueError naming the first knob out of its range (the Trainer checks its config again: the CLI and
        users set knobs after construction)."""
        for name, low in (
            ("batch_size", 1),
            ("steps", 1),
            ("warmup_steps", 0),
            ("sample_every", 0),
            ("checkpoint_every", 0),
        ):
            check_int(_OWNER, name, getattr(self, name), low)
        if type(self.seed) is not int:
            raise ValueError(f"TrainConfig: seed must be an int, got {self.seed!r}")
        check_real(_OWNER, "lr", self.lr, lambda v: 0 < v < math.inf, "a finite number > 0")
        check_real(_OWNER, "ema_decay", self.ema_decay, lambda v: 0 <= v < 1, "a number in [0, 1)")
        check_real(_OWNER, "grad_clip", self.grad_clip, lambda v: v > 0, "a number > 0 (inf: no clipping)")
        check_real(_OWNER, "cooldown", self.cooldown, lambda v: 0 <= v <= 1, "a fraction of the steps in [0, 1]")
        if self.minutes is not None:
            check_real(_OWNER, "minutes", self.minutes, lambda v: v > 0, "a number > 0 or None (inf: no limit)")
        check_flags(_OWNER, bf16=self.bf16, cuda_graph=self.cuda_graph, pipelined=self.pipelined)


@dataclass
class Preset:
    name: str
    data: str
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: str = "imf"
    # settings of the objective (imf.make_objective(objective, **objective_options)), e.g. {"fm_fraction": 0.5}
    objective_options: dict = field(default_factory=dict)


def _presets() -> dict[str, Preset]:
    return {
        "gauss": Preset(
            name="gauss",
            data="gauss",
            model=ModelConfig(
                width=32,
                channel_mult=(1, 2),
                context_dim=64,
                condition_on_t=True,
                cross_attn_resolutions=(8, 4),
            ),
        ),
        "digits": Preset(
            name="digits",
            data="digits",
            # Sized for `imf demo`: 700 steps take ~5.1 minutes on one CPU thread (0.44 s/step measured). At
            # constant lr the EMA's 1-NFE pixel FD stalled near 1.48 (steps 600-750) while the raw weights sat
            # at 2.4-3.0: weight noise dominates, so the last 30% of the steps decay the lr to 0. That way,
            # 600 steps reached FD 1.44 and 700 steps 1.30 (n = 1000, omega 1).
            model=ModelConfig(
                width=32,
                channel_mult=(1, 2),
                context_dim=128,
                condition_on_t=True,
                cross_attn_resolutions=(8, 4),
            ),
            train=TrainConfig(batch_size=64, lr=1e-3, warmup_steps=50, steps=700, cooldown=0.3),
        ),
        "cifar": Preset(
            name="cifar",
            data="folder",
            model=ModelConfig(
                image_channels=3,
                image_size=32,
                width=128,
                channel_mult=(1, 2, 2),
                num_res_blocks=2,
                cross_attn_resolutions=(16, 8),
                self_attn_resolutions=(8,),
                context_dim=256,
            ),
            train=TrainConfig(lr=2e-4, ema_decay=0.9999, warmup_steps=1000, steps=200_000),
        ),
        "latent-b": Preset(
            name="latent-b",
            data="tensors",
            model=ModelConfig(
                image_channels=4,
                image_size=32,
                # 91.4M parameters (DESIGN 3.4: ~100M, width 192-256), every GroupNorm at 8, 16, 24 or 32 channels per
                # group. Until 2026-11-26 it was channel_mult (1, 2, 3): 188M, the model of the first four GPU leases.
                width=256,
                channel_mult=(1, 1, 2),
                num_res_blocks=2,
                cross_attn_resolutions=(32, 16, 8),
                self_attn_resolutions=(8,),
                head_dim=64,
                context_dim=512,
                num_classes=1000,
            ),
            train=TrainConfig(lr=1e-4, ema_decay=0.9999, warmup_steps=5000, steps=400_000, batch_size=256),
        ),
    }


PRESET_NAMES = tuple(_presets())


def get_preset(name: str) -> Preset:
    """A fresh copy of a preset (safe to modify)."""
    presets = _presets()
    if not isinstance(name, str) or name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return dataclasses.replace(presets[name])
