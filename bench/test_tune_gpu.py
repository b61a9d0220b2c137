"""Checks of bench/tune_gpu.py's GroupNorm candidates: the launcher's own pick is always swept, and small groups
get the 1-2 warp configurations the launcher picks for them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tune_gpu

from imf_kernels.triton import group_norm as gn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels, res", tune_gpu.GN_SHAPES)
def test_the_launchers_pick_is_a_candidate(channels, res, dtype):
    cpg, hw = channels // 32, res * res
    candidates = tune_gpu.gn_candidates(cpg, hw, dtype)
    assert gn.pick_blocks(cpg, hw, dtype) in candidates
    assert len(set(candidates)) == len(candidates)
    # (the chunked pick's pipeline-stage twins aside: test_chunked_picks_sweep_fewer_pipeline_stages)
    column = 1 << (cpg - 1).bit_length()
    stages = gn.chunk_stages(dtype, column)
    padded = [
        blocks
        for blocks in candidates
        if blocks.block_c2 == 0 and blocks.groups == 1 and (blocks.single_tile or blocks.stages == stages)
    ]
    for blocks in padded:
        per_thread = blocks.block_c * blocks.block_hw // (32 * blocks.num_warps)
        assert blocks.block_c == 1 << (cpg - 1).bit_length()  # a channel column padded to a power of two
        assert per_thread >= 16 // dtype.itemsize  # at least one 16-byte vector of each input per thread
        assert blocks.single_tile or blocks.block_hw < 1 << (hw - 1).bit_length()
    # C/G = 24, 40, 48: every padded configuration again as two unpadded tiles
    split = [b for b in candidates if b.block_c2 and (b.single_tile or b.stages == min(stages, 2))]
    assert len(split) == (len(padded) if gn.split_channels(cpg) else 0)
    for blocks in split:
        assert blocks.block_c + blocks.block_c2 == cpg
        twin_stages = 1 if blocks.single_tile else stages
        assert gn.GNBlocks(column, blocks.block_hw, blocks.single_tile, blocks.num_warps, stages=twin_stages) in padded


def test_split_candidates_are_labelled():
    labels = [tune_gpu.gn_label(blocks) for blocks in tune_gpu.gn_candidates(48, 64, torch.bfloat16)]
    assert "c64 hw64 single w4" in labels and "c32+16 hw64 single w4" in labels


def test_small_single_tiles_sweep_several_slabs_per_program():
    candidates = tune_gpu.gn_candidates(16, 64, torch.bfloat16)  # C512 8x8: 1024 elements per group
    default = gn.pick_blocks(16, 64, torch.bfloat16)
    slabs = [blocks for blocks in candidates if blocks.groups > 1]
    assert {blocks.groups for blocks in slabs} == {2, 4, 8}
    for blocks in slabs:
        gn.check_gpu_rules(blocks)
        assert (blocks.block_c, blocks.block_hw, blocks.single_tile) == (default.block_c, default.block_hw, True)
        assert blocks.num_warps in (default.num_warps * blocks.groups, default.num_warps * blocks.groups // 2)
    assert "c16 x4 hw64 single w8" in [tune_gpu.gn_label(blocks) for blocks in slabs]
    assert not [b for b in tune_gpu.gn_candidates(8, 1024, torch.bfloat16) if b.groups > 1]  # chunked: none


def test_small_groups_sweep_one_and_two_warps():
    candidates = tune_gpu.gn_candidates(16, 64, torch.bfloat16)
    labels = [tune_gpu.gn_label(blocks) for blocks in candidates if blocks.groups == 1]
    assert labels == ["c16 hw64 single w2", "c16 hw64 single w1", "c16 hw64 single w4"]  # the pick (w2) first


def test_launch_config_replaces_the_pick_inside_the_block_only():
    from common import launch_config

    picked = gn.pick_blocks(16, 64, torch.bfloat16)
    candidate = gn.group_tile(picked, 4)
    with pytest.raises(RuntimeError, match="inside"):
        with launch_config(gn, "pick_blocks", candidate):
            assert gn.pick_blocks(16, 64, torch.bfloat16) == candidate
            assert gn.pick_blocks(40, 256, torch.float32) == candidate  # every call, whatever its shape
            raise RuntimeError("inside")
    assert gn.pick_blocks(16, 64, torch.bfloat16) == picked  # restored, also after an error


@pytest.mark.parametrize("text, shape", [("768x16", (768, 16)), ("256X8", (256, 8)), ("32x1", (32, 1))])
def test_gn_shapes_are_channels_by_resolution(text, shape):
    assert tune_gpu.gn_shape(text) == shape


@pytest.mark.parametrize(
    "text, message",
    [
        ("768", "is not CxRES"),
        ("768x16x2", "is not CxRES"),
        ("ax16", "is not CxRES"),
        ("100x16", "multiple of 32"),
        ("0x16", "multiple of 32"),
        ("768x0", "res >= 1"),
    ],
)
def test_bad_gn_shapes_are_refused_by_name(text, message):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=message):
        tune_gpu.gn_shape(text)


def smoke_rows(tmp_path, *args: str) -> list[dict]:
    """The rows of `bench/tune_gpu.py --smoke --families group_norm --budget 0.001 ARGS` in a child process (Triton's
    interpreter on CPU tensors)."""
    out = tmp_path / "rows.json"
    done = run_tune_gpu("--smoke", "--families", "group_norm", "--budget", "0.001", *args, "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())["rows"]


def run_tune_gpu(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # --smoke runs Triton's interpreter on CPU tensors
    command = [sys.executable, str(Path(tune_gpu.__file__)), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def test_a_smoke_sweep_takes_the_shapes_and_passes_asked_for(tmp_path):
    """--gn-shapes and --passes narrow the sweep (a lease's minute on the shapes that miss their targets): the rows
    are those shapes and passes only (here under the interpreter, --smoke)."""
    rows = smoke_rows(tmp_path, "--gn-shapes", "64x4", "--passes", "jvp")
    assert rows and {(row["shape"], row["pass_"]) for row in rows} == {("B1 C64 4x4 G32", "jvp")}
    assert sum(row["default"] for row in rows) == 1 and all(row["ms"] is not None for row in rows)
    bad = run_tune_gpu("--smoke", "--gn-shapes", "100x4")
    assert bad.returncode == 2 and "'100x4': channels must be a positive multiple of 32" in bad.stderr


def test_the_rows_file_names_the_dtype_swept(tmp_path):
    """--dtype (GPU: bfloat16 by default, float32 for the training step's graded pass) is written beside the rows;
    --smoke sweeps float32 whatever it says; another name is refused."""
    out = tmp_path / "rows.json"
    done = run_tune_gpu(
        "--smoke", "--families", "group_norm", "--budget", "0.001", "--gn-shapes", "64x4", "--passes", "fwd",
        "--dtype", "bfloat16", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(out.read_text())["dtype"] == "float32"
    bad = run_tune_gpu("--smoke", "--dtype", "fp32")
    assert bad.returncode == 2 and "--dtype: invalid choice: 'fp32'" in bad.stderr


def test_the_backward_sweep_times_the_batch_sums_tiles_too(tmp_path):
    """--passes bwd also times the backward under each tile of its batch sums (the second launch), the launcher's
    own once, as family group_norm_param_sums (here under the interpreter, --smoke: batch 1)."""
    rows = smoke_rows(tmp_path, "--gn-shapes", "64x4", "--passes", "bwd")
    rows = [row for row in rows if row["family"] == "group_norm_param_sums"]
    assert {row["config"] for row in rows} == {"sums b1 c8 w1", "sums b32 c32 w4"}
    assert [row["config"] for row in rows if row["default"]] == ["sums b1 c8 w1"]
    assert all(row["ms"] is not None and row["pass_"] == "bwd" for row in rows)


def test_batch_sums_candidates_include_the_rule_and_the_old_tile():
    from imf_kernels.triton import group_norm as gn

    candidates = tune_gpu.param_candidates(256)
    assert candidates[0] == gn.pick_param_blocks(256) and gn.ParamBlocks(32, 32, 4, False) in candidates
    assert len(set(candidates)) == len(candidates)
    assert all(c.block_b == 256 and c.one_step for c in candidates[2:])


def test_chunked_picks_sweep_fewer_pipeline_stages():
    """A chunked pick beside its twins of 1 (plain loops), 2 and 3 pipeline stages, and its split twin (at most 2
    stages) beside the split's other depth (C/G = 24: plain loops, the wide chunks' rule; C/G = 8: 3 stages);
    single tiles have no loop to pipeline."""
    first_five = [  # the pick and its variants first: what a sweep cut at a lease's deadline times
        "c32 hw128 chunk s1 w16", "c16+8 hw128 chunk s1 w16", "c32 hw128 chunk s2 w16", "c32 hw128 chunk s3 w16",
        "c16+8 hw128 chunk s2 w16",
    ]  # fmt: skip
    default = gn.pick_blocks(24, 1024, torch.bfloat16)  # C768 32x32: chunked, 32 rows
    assert not default.single_tile and default.stages == 1
    labels = [tune_gpu.gn_label(blocks) for blocks in tune_gpu.gn_candidates(24, 1024, torch.bfloat16)]
    assert labels[:5] == first_five
    # a chunked pick of up to 8192 elements: then the whole group as one tile, padded and split (16 elements of each
    # input per thread). C768 16x16 in fp32; in half precision that group is the launcher's split tile already
    assert not gn.pick_blocks(24, 256, torch.float32).single_tile
    labels = [tune_gpu.gn_label(blocks) for blocks in tune_gpu.gn_candidates(24, 256, torch.float32)]
    assert labels[:7] == [*first_five, "c32 hw256 single w16", "c16+8 hw256 single w16"]
    labels = [tune_gpu.gn_label(blocks) for blocks in tune_gpu.gn_candidates(24, 256, torch.bfloat16)]
    assert labels[0] == "c16+8 hw256 single w8"
    narrow = gn.pick_blocks(8, 1024, torch.bfloat16)  # C256 32x32: chunked, 8 rows
    assert not narrow.single_tile and narrow.stages == 3
    labels = [tune_gpu.gn_label(blocks) for blocks in tune_gpu.gn_candidates(8, 1024, torch.bfloat16)]
    assert labels[:3] == ["c8 hw256 chunk s3 w4", "c8 hw256 chunk s1 w4", "c8 hw256 chunk s2 w4"]
    assert labels[3] == "c8 hw1024 single w16"  # 8 channels have no split
    assert not [b for b in tune_gpu.gn_candidates(16, 64, torch.bfloat16) if b.stages != 1]  # single tiles


def test_the_sweep_times_every_shapes_pick_and_variants_before_the_rest(tmp_path):
    """Two rounds over the shapes (a lease's sweep is cut at its deadline): the launcher's pick and its variants on
    every shape first, then the other candidates (here under the interpreter, --smoke, two shapes)."""
    rows = smoke_rows(tmp_path, "--gn-shapes", "64x8", "256x4", "--passes", "jvp")
    first = {
        shape: [tune_gpu.gn_label(b) for b in tune_gpu.gn_candidate_groups(cpg, hw, torch.float32)[0]]
        for shape, cpg, hw in (("B1 C64 8x8 G32", 2, 64), ("B1 C256 4x4 G32", 8, 16))
    }
    in_first = [row["config"] in first[row["shape"]] for row in rows]
    assert in_first == sorted(in_first, reverse=True) and any(in_first) and not all(in_first)
    assert [row["shape"] for row in rows[: in_first.count(True)]] == [
        shape for shape in first for _ in first[shape]
    ]  # the first round: each shape's pick and variants, in the order asked for


def test_the_first_group_has_the_picks_split_twin_for_single_tiles_too():
    first, rest = tune_gpu.gn_candidate_groups(24, 64, torch.bfloat16)  # C768 8x8: a padded single tile
    assert [tune_gpu.gn_label(b) for b in first[:2]] == ["c32 hw64 single w2", "c16+8 hw64 single w2"]
    assert not set(first) & set(rest)
