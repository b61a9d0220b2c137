"""A short iMF training run on the analytic Gaussian classes, scored against the exact one-step map (DESIGN 6).

For scale: a one-step flow-matching Euler sample of the exact field scores 1.0 here (it returns the class mean).
The run is fixed in steps, not seconds, so its result does not depend on the machine's load; on an idle 2-core
machine it takes under 2 minutes.
"""

import time

import pytest
import torch

from imf.config import TrainConfig, get_preset
from imf.gauss import GaussClasses, one_step_error
from imf.model import IMFNet
from imf.objectives import IMFObjective
from imf.train import Trainer

STEPS = 480


@pytest.mark.slow
def test_imf_on_gauss_reaches_one_step_error_below_0_6():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is faster here, and the run is reproducible
    try:
        torch.manual_seed(0)
        data = GaussClasses.from_digits()
        model = IMFNet(get_preset("gauss").model)
        data_gen = torch.Generator().manual_seed(0)
        cfg = TrainConfig(batch_size=32, lr=3e-3, warmup_steps=30, ema_decay=0.98, steps=STEPS, cooldown=0.94)
        trainer = Trainer(model, IMFObjective(), lambda: data.sample(cfg.batch_size, data_gen), cfg)
        start = time.perf_counter()
        trainer.run(steps=STEPS)
        seconds = time.perf_counter() - start
        error = one_step_error(trainer.ema.model, data, n=512, omega=1.0)
    finally:
        torch.set_num_threads(threads)
    print(f"iMF on gauss: {STEPS} steps in {seconds:.0f} s, 1-NFE relative error (EMA, omega 1) {error:.3f}")
    assert error < 0.6
