"""Multi-process training: 2 CPU processes on gloo through torchrun equal one process on the combined batch (DDP and
FSDP2, the fused JVP path), a checkpoint from 2 processes resumes on 1, and the DDP wrapper refuses a graded call
that would bypass the gradient all-reduce.

This file is also the worker torchrun launches: `python -m torch.distributed.run ... tests/test_distributed.py OUT`.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imf.checkpoint import load_checkpoint, read_history
from imf.config import get_preset
from imf.distributed import DistInfo, init_distributed, shutdown, slice_rows
from imf.model import Cond, IMFNet
from imf.objectives import IMFDraws, make_objective
from imf.train import Trainer, make_stream, train

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gauss():
    """The gauss preset at width 8: a step takes milliseconds; lr 1e-2 so that 3 steps move the weights visibly."""
    preset = get_preset("gauss")
    preset.model.width, preset.model.context_dim = 8, 16
    t = preset.train
    t.batch_size, t.steps, t.warmup_steps, t.lr, t.checkpoint_every = 8, STEPS, 1, 1e-2, 0
    return preset


def float64_trainer(
    dist: DistInfo | None = None,
    parallel: str = "ddp",
    nan_at: int | None = None,
    pipelined: bool = False,
    channels_last: bool = False,
) -> Trainer:
    """The tiny iMF run in float64 (fused JVP path), so that agreement is checked at float64 round-off: in float32,
    Adam's division by sqrt(v) turns the round-off of near-zero gradients (behind the zero-initialised layers)
    into visible parameter differences. `nan_at`: that step's batch has a NaN in its last row (the last rank's
    slice) and the trainer skips non-finite steps. `pipelined`: TrainConfig.pipelined; `channels_last`:
    ModelConfig.channels_last."""
    preset = tiny_gauss()
    preset.train.pipelined = pipelined
    preset.model.channels_last = channels_last
    stream = make_stream(preset)
    torch.manual_seed(preset.train.seed)
    model = IMFNet(preset.model).double()
    calls = 0

    def next_batch():
        nonlocal calls
        calls += 1
        x, y = stream()
        x = x.double()
        if calls == nan_at:
            x[-1, 0, 0, 0] = float("nan")
        return x, y

    generator = torch.Generator().manual_seed(preset.train.seed)
    objective = make_objective("imf")
    skip = nan_at is not None
    return Trainer(
        model, objective, next_batch, preset.train, generator, dist=dist, parallel=parallel, skip_nonfinite=skip
    )


def torchrun(*args: str, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def worker(out: str) -> None:
    """Each rank: STEPS float64 steps under DDP, then under FSDP2, then under DDP with channels-last maps, then under
    DDP with a NaN at step 2 that only rank 1's rows see (skipped), plain and pipelined; rank 0 saves the trainers'
    states."""
    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    assert dist.world_size == 2
    runs = [("ddp", "ddp", None, False, False), ("fsdp", "fsdp", None, False, False)]
    runs += [("ddp_cl", "ddp", None, False, True)]
    runs += [("ddp_nan", "ddp", 2, False, False), ("ddp_nan_pipelined", "ddp", 2, True, False)]
    for name, parallel, nan_at, pipelined, channels_last in runs:
        trainer = float64_trainer(dist, parallel, nan_at, pipelined, channels_last)
        history = trainer.run(steps=STEPS)
        state = trainer.state_dict()  # whole tensors (gathered on every rank under FSDP2)
        if dist.is_main:
            torch.save({"state": state, "losses": [h["loss"] for h in history]}, f"{out}/{name}.pt")
    shutdown(dist)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def single_float64():
    trainer = float64_trainer()
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    history = trainer.run(steps=STEPS)
    return trainer, initial, [h["loss"] for h in history]


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("worker")
    done = torchrun(__file__, str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_two_gloo_processes_equal_one_process_on_the_combined_batch(worker_out, single_float64):
    single, initial, losses = single_float64
    moved = max_difference(single.model.state_dict(), initial)
    assert moved > 1e-2  # the weights really moved, so agreement is not trivial
    for parallel in ("ddp", "fsdp", "ddp_cl"):  # (ddp_cl: channels-last maps, the same run)
        got = torch.load(worker_out / f"{parallel}.pt", weights_only=False)
        assert got["losses"] == pytest.approx(losses, rel=1e-12, abs=0)
        # a rank training on its half alone would be off by ~lr (1e-2) per step; round-off is ~1e-15
        assert max_difference(got["state"]["model"], single.model.state_dict()) < 1e-10, parallel
        assert max_difference(got["state"]["ema"], single.ema.model.state_dict()) < 1e-10, parallel
        moments = {f"{i}.{k}": v for i, s in got["state"]["optimizer"]["state"].items() for k, v in s.items()}
        expected = {f"{i}.{k}": v for i, s in single.opt.state_dict()["state"].items() for k, v in s.items()}
        assert max_difference(moments, expected) < 1e-10, parallel
        assert got["state"]["step_count"] == STEPS


def test_a_nan_on_one_rank_is_skipped_on_every_rank_as_in_one_process(worker_out):
    """Rank 1 alone sees the NaN row, yet the all-reduced loss is NaN on both ranks: both skip step 2 (DDP's
    bookkeeping survives the skipped update) and the run equals one process skipping the same step."""
    single = float64_trainer(nan_at=2)
    losses = [h["loss"] for h in single.run(steps=STEPS)]
    got = torch.load(worker_out / "ddp_nan.pt", weights_only=False)
    assert single.skipped_steps == 1 and losses[1] != losses[1]  # NaN
    assert got["losses"][1] != got["losses"][1]
    assert got["losses"][::2] == pytest.approx(losses[::2], rel=1e-12, abs=0)
    assert max_difference(got["state"]["model"], single.model.state_dict()) < 1e-10


def test_a_pipelined_ddp_run_skips_the_nan_on_the_device_of_every_rank(worker_out):
    """Pipelined under DDP: the all-reduced NaN loss skips step 2's update on every rank without a host read (fused
    AdamW's found_inf), and the run equals one plain process skipping the same step, to float64 round-off."""
    single = float64_trainer(nan_at=2)
    losses = [h["loss"] for h in single.run(steps=STEPS)]
    got = torch.load(worker_out / "ddp_nan_pipelined.pt", weights_only=False)
    assert got["losses"][1] != got["losses"][1]  # NaN
    assert got["losses"][::2] == pytest.approx(losses[::2], rel=1e-12, abs=0)
    assert max_difference(got["state"]["model"], single.model.state_dict()) < 1e-10
    assert max_difference(got["state"]["ema"], single.ema.model.state_dict()) < 1e-10
    assert got["state"]["step_count"] == STEPS


def test_fsdp_refuses_a_channels_last_model_by_name():
    """FSDP2 shards contiguous parameters only: a channels-last model is refused with its first such weight named."""
    dist = DistInfo(rank=0, world_size=2, local_rank=0)
    with pytest.raises(ValueError, match=r"parallel='fsdp' shards contiguous parameters only .* train it with"):
        float64_trainer(dist, "fsdp", channels_last=True)


def test_fsdp_checkpoint_state_resumes_in_one_process(worker_out, single_float64):
    """The FSDP2 run's gathered state loads into a plain single-process trainer, which then continues exactly as
    the single-process run continues."""
    state = torch.load(worker_out / "fsdp.pt", weights_only=False)["state"]
    resumed = float64_trainer()
    resumed.load_state_dict(state)
    reference = float64_trainer()
    reference.load_state_dict(single_float64[0].state_dict())
    resumed.run(steps=2)
    reference.run(steps=2)
    assert max_difference(resumed.model.state_dict(), reference.model.state_dict()) < 1e-10


def test_cli_under_torchrun_matches_one_process_and_resumes_on_another_world_size(tmp_path):
    """`torchrun -m imf.cli train` in float32 (the user's path): 2 processes for STEPS steps, then resumed by one
    process for 2 more, against one process for STEPS + 2 steps straight."""
    flags = ["--preset", "gauss", "--width", "8", "--batch-size", "8", "--warmup-steps", "1", "--lr", "0.01"]
    flags += ["--checkpoint-every", "0", "--threads", "1", "--no-progress", "--device", "cpu"]
    two = tmp_path / "two"
    done = torchrun("-m", "imf.cli", "train", *flags, "--steps", str(STEPS), "--out", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained to step 3") == 1  # rank 0 alone prints

    preset = tiny_gauss()
    preset.model.context_dim = get_preset("gauss").model.context_dim  # the CLI has no flag for it
    one = train(preset, tmp_path / "one", progress=False, log=lambda m: None)
    _, state = load_checkpoint(two)
    # float32: Adam amplifies the round-off of near-zero gradients; measured 3.6e-5 against a 6e-3 update
    assert max_difference(state["model"], one.trainer.model.state_dict()) < 3e-4
    history = read_history(two)
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in one.history], rel=1e-5)

    preset.train.steps = STEPS + 2
    resumed = train(preset, two, resume=True, progress=False, log=lambda m: None)
    straight = train(preset, tmp_path / "one", resume=True, progress=False, log=lambda m: None)
    assert resumed.trainer.step_count == straight.trainer.step_count == STEPS + 2
    assert max_difference(resumed.trainer.model.state_dict(), straight.trainer.model.state_dict()) < 3e-4


@pytest.fixture
def one_process_group():
    """A gloo group of one process (in this process), enough to construct DDP."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_wrapper_exposes_no_grad_targets_and_refuses_graded_bypass(one_process_group):
    from imf.distributed import wrap_ddp

    torch.manual_seed(0)
    model = IMFNet(tiny_gauss().model)
    wrapped = wrap_ddp(model, DistInfo(), find_unused_parameters=False)
    b = 3
    one = torch.ones(b)
    z = torch.randn(b, 1, 8, 8)
    cond = Cond(h=0.3 * one, y=torch.arange(b), omega=2 * one, t_min=0.2 * one, t_max=0.7 * one, t=0.6 * one)
    assert wrapped.cfg is model.cfg and wrapped.takes_tangents
    with torch.no_grad():
        assert torch.equal(wrapped.fused_v(z, cond), model.fused_v(z, cond))
    with pytest.raises(RuntimeError, match=r"model\.u\(\.\.\.\) was called with grad enabled under DDP"):
        wrapped.u(z, cond)
    with pytest.raises(AttributeError):
        wrapped.trunk  # noqa: B018 (the reference path's pieces are not forwarded)


# DDP models freed after `shutdown`, as a run's trainer is when `imf train` returns: torch 2.11 and 2.13 hung within
# the first ~50 of these groups before shutdown kept the group's Python handle (the Reducer destroyed the group with
# the GIL held while a gloo thread waited for it; imf.distributed.shutdown). A group of one process stands in for
# the job's: shutdown acts on a DistInfo of several.
FREED_AFTER_SHUTDOWN = """
import faulthandler, torch, torch.distributed as dist
from imf.distributed import DistInfo, all_mean, any_rank, shutdown, wrap_ddp
info = DistInfo(rank=0, world_size=2, backend="gloo")
for _ in range(GROUPS):
    faulthandler.dump_traceback_later(20, exit=True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = wrap_ddp(torch.nn.Linear(4, 4), info, find_unused_parameters=False)
    model(torch.randn(2, 4)).sum().backward()
    all_mean(torch.randn(()), info)
    any_rank(False, info)
    shutdown(info)
    del model
print("freed", GROUPS)
"""


def test_ddp_models_freed_after_shutdown_do_not_hang_the_process():
    groups = 500
    script = FREED_AFTER_SHUTDOWN.replace("GROUPS", str(groups))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["freed", str(groups)]


def test_slices_and_batch_check():
    dist = DistInfo(rank=1, world_size=4)
    assert dist.rows(12) == slice(3, 6)
    with pytest.raises(ValueError, match="batch size 10 must be a multiple of the world size 4"):
        dist.check_batch(10)
    rows = torch.arange(8.0)
    draws = IMFDraws(rows, rows + 1, torch.randn(8, 1, 2, 2), rows, rows, rows, rows > 3)
    part = slice_rows(draws, slice(2, 4))
    assert torch.equal(part.r, torch.tensor([3.0, 4.0])) and torch.equal(part.e, draws.e[2:4])
    assert torch.equal(part.drop, torch.tensor([False, False]))


if __name__ == "__main__":
    worker(sys.argv[1])
