"""Bad input to the `imf` API gets one clear error naming the argument and what it accepts, before any work or
any write (the kernels' own argument checks are tested with each op)."""

import dataclasses
import json
import math
import re

import pytest
import torch

import imf_kernels
from imf import IMFNet, get_preset, make_objective, sample
from imf.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from imf.checks import check_flags, check_int, check_real, check_setting, is_real
from imf.config import TrainConfig
from imf.data import DataError
from imf.evaluate import class_omega_samples, evaluate_digits, evaluate_gauss
from imf.model import ModelConfig
from imf.train import Trainer, build_trainer, make_stream, preset_to_dict, train


def digits_model() -> IMFNet:
    torch.manual_seed(0)
    return IMFNet(dataclasses.replace(get_preset("digits").model, width=8, context_dim=16))


def batch(b: int = 4):
    return torch.randn(b, 1, 8, 8), torch.arange(b) % 10


BAD_MODEL_CONFIGS = [
    ({"head_dim": 0}, "head_dim must be an int >= 1, got 0"),
    ({"width": 16.0}, "width must be an int >= 1, got 16.0"),
    ({"num_res_blocks": 0}, "num_res_blocks must be an int >= 1, got 0"),
    ({"num_classes": 0}, "num_classes must be an int >= 1, got 0"),
    ({"channel_mult": ()}, "channel_mult needs at least one level"),
    ({"channel_mult": (1, 0)}, "channel_mult's entries must be an int >= 1, got 0"),
    (
        {"cross_attn_resolutions": (16,)},
        "cross_attn_resolutions (16,) must be among the levels' feature-map sizes (8, 4)",
    ),
    ({"self_attn_resolutions": (8,)}, "self_attn_resolutions (8,) can only hold the lowest feature-map size, 4"),
    ({"width": 7, "head_dim": 2}, "head_dim 2 gives 3 heads for an attention block's 7 channels, which they do not"),
    ({"tokens": {"class": 8, "omega": 4}}, "tokens needs a count for t_min, t_max, h"),
    ({"tokens": {"class": 8, "omega": 0, "t_min": 2, "t_max": 2, "h": 4}}, "tokens['omega'] must be an int >= 1"),
]


@pytest.mark.parametrize("overrides, message", BAD_MODEL_CONFIGS, ids=[m for _, m in BAD_MODEL_CONFIGS])
def test_model_config_refuses_what_would_build_a_wrong_model(overrides, message):
    with pytest.raises(ValueError, match="^ModelConfig: " + re.escape(message)):
        ModelConfig(**overrides)


def test_head_dim_is_the_heads_target_size():
    """C // head_dim heads, at least one, of C / heads channels each (bench/compare_objectives.py's width-48 gauss
    model runs one head of 48 at head_dim 32)."""
    assert IMFNet(ModelConfig(width=8, context_dim=16, head_dim=32)).mid_cross_attn.heads == 1
    assert IMFNet(ModelConfig(width=48, context_dim=16, head_dim=32)).mid_cross_attn.heads == 3  # 96 channels
    one_level = ModelConfig(width=32, context_dim=16, head_dim=12, channel_mult=(1,), cross_attn_resolutions=(8,))
    assert IMFNet(one_level).down[0].attn[0].heads == 2  # of 16 channels each


def test_imfnet_names_the_preset_mistake():
    with pytest.raises(TypeError, match=r"IMFNet takes a ModelConfig \(a preset's model config is preset.model\)"):
        IMFNet(get_preset("digits"))


BAD_SAMPLER_INPUT = [
    ("class 11", lambda z, y: (z, torch.full((4,), 11)), ValueError, r"y must hold class ids in \[0, 10\] \(10 = the"),
    ("class -1", lambda z, y: (z, y - 1), ValueError, r"got min -1, max 2"),
    ("3 labels", lambda z, y: (z, y[:3]), ValueError, r"y must have shape \(B,\) = \(4,\), one class id per image"),
    (
        "float labels",
        lambda z, y: (z, y.float()),
        TypeError,
        "y must be an integer tensor of class ids, got torch.float32",
    ),
    (
        "list labels",
        lambda z, y: (z, y.tolist()),
        TypeError,
        "y must be an integer tensor of class ids, got <class 'list'>",
    ),
    ("3 channels", lambda z, y: (z.expand(4, 3, 8, 8), y), ValueError, r"noise must have shape \(B, 1, 8, 8\)"),
    ("16x16", lambda z, y: (z.repeat(1, 1, 2, 2), y), ValueError, r"got \(4, 1, 16, 16\)"),
    ("flat", lambda z, y: (z.flatten(1), y), ValueError, r"noise must have shape \(B, 1, 8, 8\)"),
    ("half", lambda z, y: (z.half(), y), TypeError, "noise must be torch.float32 .* got torch.float16"),
    ("batch 0", lambda z, y: (z[:0], y[:0]), ValueError, "noise must hold at least one image, got batch 0"),
]


@pytest.mark.parametrize("case, make, kind, message", BAD_SAMPLER_INPUT, ids=[c[0] for c in BAD_SAMPLER_INPUT])
def test_sampler_checks_noise_and_labels_against_the_model(case, make, kind, message):
    z, y = make(*batch())
    with pytest.raises(kind, match=message):
        sample(digits_model(), z, y)


def test_sampler_takes_the_null_class():
    z, _ = batch()
    out = sample(digits_model(), z, torch.full((4,), 10))
    assert out.shape == z.shape and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs, kind, message",
    [
        ({"steps": 2.5}, ValueError, "steps must be an int >= 1, got 2.5"),
        ({"steps": True}, ValueError, "steps must be an int >= 1, got True"),
        ({"omega": torch.full((4,), 2.0)}, TypeError, "omega must be a number .* got Tensor"),
        ({"interval": 0.5}, TypeError, r"interval must be a pair \(t_min, t_max\), got 0.5"),
        ({"interval": (0.1, 0.2, 0.3)}, TypeError, r"interval must be a pair \(t_min, t_max\)"),
    ],
)
def test_sampler_checks_its_options(kwargs, kind, message):
    with pytest.raises(kind, match=message):
        sample(digits_model(), *batch(), **kwargs)


@pytest.mark.parametrize("name", ["imf", "mf", "fm"])
@pytest.mark.parametrize(
    "make, kind, message",
    [
        (lambda x, y: (x.half(), y), TypeError, "x must be torch.float32"),
        (lambda x, y: (x.repeat(1, 1, 2, 2), y), ValueError, r"x must have shape \(B, 1, 8, 8\)"),
        (lambda x, y: (x, y[:1]), ValueError, r"y must have shape \(B,\) = \(4,\)"),
        (lambda x, y: (x, y.float()), TypeError, "y must be an integer tensor"),
    ],
    ids=["half", "16x16", "one label", "float labels"],
)
def test_losses_check_their_batch_against_the_model(name, make, kind, message):
    x, y = make(*batch())
    with pytest.raises(kind, match=message):
        make_objective(name).loss(digits_model(), x, y, torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("imf", {"omega_max": 0.5}, r"IMFObjective: omega_max must be a finite number in \[1, inf\), got 0.5"),
        ("imf", {"p_std": math.nan}, "IMFObjective: p_std must be a finite number"),
        ("imf", {"fm_fraction": 2.0}, r"IMFObjective: fm_fraction must be a finite number in \[0, 1\], got 2.0"),
        ("imf", {"class_dropout": 1.0}, r"IMFObjective: class_dropout must be a finite number in \[0, 1\)"),
        ("imf", {"bf16": "yes"}, "IMFObjective: bf16 must be True or False, got 'yes'"),
        ("mf", {"cfg_kappa": math.inf}, "MeanFlowObjective: cfg_kappa must be a finite number"),
        (
            "mf",
            {"cfg_t_min": 0.7, "cfg_t_max": 0.3},
            r"MeanFlowObjective: cfg_t_max must be a finite number in \[0.7, 1\]",
        ),
        ("fm", {"p_std": 0.0}, r"FlowMatchingObjective: p_std must be a finite number in \(0, inf\), got 0.0"),
    ],
)
def test_objectives_check_their_settings(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_objective(name, **kwargs)


BAD_TRAIN_CONFIGS = [
    ({"grad_clip": -1.0}, r"grad_clip must be a number > 0 \(inf: no clipping\), got -1.0"),
    ({"grad_clip": 0.0}, "grad_clip must be a number > 0"),
    ({"grad_clip": math.nan}, "grad_clip must be a number > 0"),
    ({"ema_decay": math.nan}, r"ema_decay must be a number in \[0, 1\), got nan"),
    ({"ema_decay": 1.5}, r"ema_decay must be a number in \[0, 1\)"),
    ({"lr": math.inf}, "lr must be a finite number > 0, got inf"),
    ({"lr": "1e-3"}, "lr must be a finite number > 0, got '1e-3'"),
    ({"steps": 0}, "steps must be an int >= 1, got 0"),
    ({"warmup_steps": -5}, "warmup_steps must be an int >= 0, got -5"),
    ({"cooldown": 2.0}, r"cooldown must be a fraction of the steps in \[0, 1\], got 2.0"),
    ({"minutes": -1.0}, "minutes must be a number > 0 or None"),
    ({"checkpoint_every": -1}, "checkpoint_every must be an int >= 0"),
    ({"pipelined": "no"}, "pipelined must be True or False, got 'no'"),
]


@pytest.mark.parametrize("overrides, message", BAD_TRAIN_CONFIGS, ids=[m.split(" ")[0] for _, m in BAD_TRAIN_CONFIGS])
def test_train_config_refuses_knobs_out_of_range(overrides, message):
    with pytest.raises(ValueError, match="^TrainConfig: " + message):
        TrainConfig(**overrides)


def test_trainer_checks_a_config_changed_after_construction_and_its_own_options():
    preset = get_preset("gauss")
    preset.model.width, preset.model.context_dim = 8, 16
    stream = make_stream(preset)
    preset.train.grad_clip = -1.0  # set after construction, as the CLI and users do
    with pytest.raises(ValueError, match="TrainConfig: grad_clip must be a number > 0"):
        build_trainer(preset, stream)
    preset.train.grad_clip = 1.0
    model, objective = IMFNet(preset.model), make_objective("imf")
    with pytest.raises(ValueError, match="Trainer: parallel must be one of ddp, fsdp, got 'bogus'"):
        Trainer(model, objective, stream, preset.train, parallel="bogus")
    with pytest.raises(TypeError, match=r"Trainer: objective must be an objective object \(imf.make_objective"):
        Trainer(model, "fm", stream, preset.train)
    with pytest.raises(TypeError, match="Trainer: cfg must be a TrainConfig"):
        Trainer(model, objective, stream, {"lr": 1e-3})
    with pytest.raises(ValueError, match="Trainer: skip_nonfinite must be True or False, got 1"):
        Trainer(model, objective, stream, preset.train, skip_nonfinite=1)


def test_trainer_checks_settings_changed_after_construction_and_what_next_batch_returns():
    preset = get_preset("digits")
    preset.model.width, preset.model.context_dim, preset.train.batch_size = 8, 16, 4
    objective = make_objective("imf")
    objective.omega_max = 0.5  # the sampler refuses omega < 1: training on it was silent
    with pytest.raises(ValueError, match="IMFObjective: omega_max"):
        Trainer(IMFNet(preset.model), objective, make_stream(preset), preset.train)
    x = torch.randn(2, 1, 8, 8)
    trainer = Trainer(IMFNet(preset.model), make_objective("imf"), lambda: x, preset.train)
    with pytest.raises(TypeError, match=r"next_batch\(\) must return a pair \(x, y\), got Tensor"):
        trainer.step()  # two rows: unpacked as "x" and "y" before
    trainer = Trainer(IMFNet(preset.model), make_objective("imf"), lambda: (x, x, x), preset.train)
    with pytest.raises(TypeError, match="got tuple of length 3"):
        trainer.step()


def tensor_preset():
    preset = get_preset("digits")
    preset.data = "tensors"
    preset.model.width, preset.model.context_dim = 8, 16
    return preset


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x, y: (x, y.float()), "y must be an integer tensor of class ids, got torch.float32"),
        (lambda x, y: (x, y - 1), "y must be class ids >= 0, got min -1"),
        (lambda x, y: ((x * 100).to(torch.uint8), y), "x must be a float tensor, got torch.uint8"),
        (lambda x, y: (x, y[:3]), "y must be 1-D with one label per row of x"),
        (lambda x, y: [x, y, y], r"data must be a pair \(x, y\)"),
    ],
    ids=["float labels", "negative labels", "uint8 images", "short labels", "triple"],
)
def test_in_memory_data_is_checked_as_a_files_tensors_are(make, message):
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    with pytest.raises(DataError, match=message):
        make_stream(tensor_preset(), data=make(x, y))


def test_in_memory_data_of_another_float_dtype_trains_as_float32():
    x, y = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.arange(16) % 10
    got, labels = make_stream(tensor_preset(), data=(x, y.int()))()
    assert got.dtype == torch.float32 and labels.dtype == torch.int64


def test_the_gauss_preset_refuses_data_it_would_ignore():
    with pytest.raises(DataError, match="the 'gauss' preset generates its gauss data"):
        make_stream(get_preset("gauss"), data=(torch.randn(8, 1, 8, 8), torch.arange(8)))


def test_data_that_does_not_fit_the_model_names_the_presets_fields(tmp_path):
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    with pytest.raises(DataError, match=r"pass data \(tensors in memory\) or data_path .*, not both"):
        make_stream(tensor_preset(), tmp_path / "x.npz", data=(x, y))  # the path was silently ignored
    with pytest.raises(DataError, match="set preset.model.image_channels / image_size"):
        make_stream(tensor_preset(), data=(torch.randn(16, 3, 8, 8), y))
    with pytest.raises(DataError, match="class id 11 but the model has 10 classes; set preset.model.num_classes"):
        make_stream(tensor_preset(), data=(x, y + 2))
    with pytest.raises(DataError, match="needs a path: data_path"):
        make_stream(tensor_preset())


@pytest.fixture
def saved(tmp_path):
    preset = get_preset("gauss")
    preset.model.width, preset.model.context_dim = 8, 16
    trainer = build_trainer(preset, make_stream(preset))
    trainer.run(steps=1)
    save_checkpoint(tmp_path / "run", trainer.state_dict(), preset_to_dict(preset))
    return trainer, preset, tmp_path / "run"


def test_a_partial_state_changes_nothing_in_the_trainer(saved):
    trainer, _, folder = saved
    _, weights_only = load_checkpoint(folder, parts=("model",))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for value in weights_only["model"].values():
        value.add_(1.0)
    with pytest.raises(CheckpointError, match="the state has no ema, optimizer, generator, global_rng"):
        trainer.load_state_dict(weights_only)
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("parts", ["model", ("model", "weights")])
def test_load_checkpoint_names_its_parts(saved, parts):
    with pytest.raises(ValueError, match="load_checkpoint: parts must be a tuple of 'model', 'ema', 'optimizer'"):
        load_checkpoint(saved[2], parts=parts)


def test_save_checkpoint_checks_before_it_writes(saved, tmp_path):
    trainer, preset, _ = saved
    with pytest.raises(CheckpointError, match="trainer_state must be Trainer.state_dict"):
        save_checkpoint(tmp_path / "a", trainer.model.state_dict(), preset_to_dict(preset))
    with pytest.raises(CheckpointError, match="config and history must be JSON-able"):
        save_checkpoint(tmp_path / "b", trainer.state_dict(), {"preset": preset})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_evaluations_check_the_model_fits_their_data():
    cfg = dataclasses.replace(get_preset("digits").model, width=8, context_dim=16, num_classes=5)
    with pytest.raises(ValueError, match=r"evaluate_gauss: the model must take images of shape \(1, 8, 8\) and at"):
        evaluate_gauss(IMFNet(cfg), n=4)
    with pytest.raises(ValueError, match="evaluate_digits: the model must take"):
        evaluate_digits(IMFNet(dataclasses.replace(cfg, image_channels=3, num_classes=10)), n=4)
    with pytest.raises(ValueError, match="evaluate_digits: n must be an int >= 2"):
        evaluate_digits(digits_model(), n=0)
    with pytest.raises(ValueError, match="evaluate_digits: omegas must be a non-empty sequence"):
        evaluate_digits(digits_model(), omegas=(), n=4)
    with pytest.raises(ValueError, match="evaluate_digits: seed must be an int, got 'a'"):
        evaluate_digits(digits_model(), n=4, seed="a")
    with pytest.raises(ValueError, match="class_omega_samples: classes and omegas must not be empty"):
        class_omega_samples(digits_model(), torch.randn(4, 1, 8, 8), [], [1.0])


def test_names_that_are_not_strings_are_refused_in_words():
    with pytest.raises(ValueError, match=r"unknown preset \['digits'\]; choose one of gauss, digits"):
        get_preset(["digits"])
    with pytest.raises(ValueError, match=r"unknown objective \['imf'\]; choose one of imf, mf, fm"):
        make_objective(["imf"])
    with pytest.raises(ValueError, match=r"unknown backend \['torch'\]; accepted: auto"):
        imf_kernels.group_norm_act(torch.randn(1, 8, 2, 2), 2, backend=["torch"])


def test_a_checkpoint_config_out_of_range_is_a_checkpoint_error(saved):
    _, preset, folder = saved
    manifest = json.loads((folder / "checkpoint.json").read_text())
    manifest["config"]["model"]["head_dim"] = 0
    (folder / "checkpoint.json").write_text(json.dumps(manifest))
    message = r"checkpoint: .*checkpoint.json's config is not a preset this version reads: .*head_dim must be an int"
    with pytest.raises(CheckpointError, match=message):
        train(preset, folder, resume=True, progress=False, log=lambda m: None)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: check_setting("O", "a", 1.0, 0.0, 1.0, open_high=True),
            r"O: a must be a finite number in \[0, 1\), got 1.0",
        ),
        (
            lambda: check_setting("O", "a", 0.0, 0.0, open_low=True),
            r"O: a must be a finite number in \(0, inf\), got 0.0",
        ),
        (
            lambda: check_setting("O", "a", math.nan, -math.inf),
            r"O: a must be a finite number in \[-inf, inf\), got nan",
        ),
        (lambda: check_setting("O", "a", True, 0.0), "O: a must be a number, got True"),
        (
            lambda: check_real(None, "b", math.nan, lambda v: v >= 0, "a number >= 0"),
            "^b must be a number >= 0, got nan",
        ),
        (lambda: check_int("O", "n", 3.0, 1), r"O: n must be an int >= 1, got 3.0"),
        (lambda: check_int("O", "n", False, 0, " (why)"), r"O: n must be an int >= 0 \(why\), got False"),
        (lambda: check_flags("O", x=True, y=0), "O: y must be True or False, got 0"),
    ],
)
def test_the_shared_checks_name_the_argument_and_its_range(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_shared_checks_accept_the_ends_they_include():
    check_setting("O", "a", 0.0, 0.0, 1.0)
    check_setting("O", "a", 1, 0.0, 1.0)  # ints are numbers
    check_int("O", "n", 0, 0)
    check_flags("O", x=False, y=True)
    check_real("O", "b", math.inf, lambda v: v > 0, "a number > 0 (inf: none)")
    assert not is_real(True) and is_real(2) and is_real(0.5)
