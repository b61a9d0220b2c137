"""What one training step launches: every torch op that would run a kernel on a GPU and every Triton kernel, counted
on this CPU (tests/launches.py's recorder; Triton through its interpreter). An eager step on a GPU pays host time
per launch (the H100's fused latent-b step: 3808 kernels, the device busy 65% of the step), so fewer launches is a
shorter step wherever the host sets the pace.

    PYTHONPATH=. python bench/count_launches.py                        # latent-b at width 64, batch 4, triton, fp32
    PYTHONPATH=. python bench/count_launches.py --backend torch --bf16 --top 20
    PYTHONPATH=. python bench/count_launches.py --sites 30        # where the 30 most frequent (op, site) come from

The model keeps the preset's structure (levels, blocks, attention) at a narrower `--width`, so the interpreter
finishes in minutes; the counts do not depend on the width or the batch while the width is at least the preset's
head dim (latent-b: 64; below it the attention layers' head dims differ and `imf.layers.kv_bank` leaves each
cross-attention block its own keys and values: ~150 launches more). bf16 targets need --backend torch here
(the interpreter takes fp32/fp16 only). Prints the total and the most frequent ops; --json writes them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: no GPU here

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def count_step(
    preset: str,
    width: int,
    batch: int,
    backend: str,
    bf16: bool,
    objective: str,
    seed: int = 0,
    warmup: int = 1,
    sites: list[str] | None = None,
) -> list:
    """The launches of one step (loss and backward) of a freshly initialised model, in order, after `warmup`
    uncounted steps (what a first step builds once and keeps, e.g. `imf.layers.film_bank`'s gather order, is
    not a launch of every step). `sites`: a list given each launch's call site (tests/launches.py `call_site`)."""
    from launches import recorded

    import imf_kernels
    from imf.config import get_preset
    from imf.model import IMFNet
    from imf.objectives import make_objective

    cfg = get_preset(preset).model
    cfg.width = width
    cfg.__post_init__()
    torch.manual_seed(seed)
    model = IMFNet(cfg)
    with torch.no_grad():  # no zero-initialised layer: every branch computes something
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.image_channels, cfg.image_size, cfg.image_size, generator=gen)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen)
    obj = make_objective(objective)
    if bf16:
        obj.bf16 = True
    draws = obj.draw(x, torch.Generator().manual_seed(seed + 1))
    with imf_kernels.use_backend(backend):
        for _ in range(warmup):
            obj.loss_from_draws(model, x, y, draws)[0].backward()
            model.zero_grad(set_to_none=True)  # as a training step starts: no gradients to accumulate into
        with recorded(sites) as launched:
            loss = obj.loss_from_draws(model, x, y, draws)[0]
            loss.backward()
    return launched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="latent-b")
    parser.add_argument("--width", type=int, default=64, help="base channels (the preset's structure, narrower)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--backend", default="triton", choices=("triton", "torch"))
    parser.add_argument("--objective", default="imf", choices=("imf", "mf"))
    parser.add_argument("--bf16", action="store_true", help="bf16 targets (the GPU configuration; --backend torch)")
    parser.add_argument("--top", type=int, default=12, help="most frequent ops to print")
    parser.add_argument(
        "--sites",
        type=int,
        default=0,
        metavar="N",
        help="also the N most frequent (op, call site) pairs: where they come from",
    )
    parser.add_argument("--json", help="write {total, counts} here (and {sites} with --sites)")
    args = parser.parse_args()
    if args.bf16 and args.backend == "triton":
        parser.error("--bf16 needs --backend torch: the Triton interpreter takes fp32 and fp16 only")
    if args.sites < 0:
        parser.error(f"--sites must be a count >= 0, got {args.sites}")
    start = time.perf_counter()
    sites: list[str] | None = [] if args.sites else None
    launched = count_step(args.preset, args.width, args.batch, args.backend, args.bf16, args.objective, sites=sites)
    counts = collections.Counter(launched)
    label = f"{args.preset} (width {args.width}), batch {args.batch}, {args.objective}, {args.backend}"
    print(f"{label}, {'bf16 targets' if args.bf16 else 'fp32'}: {len(launched)} launches a step")
    for name, count in counts.most_common(args.top):
        print(f"  {count:5d}  {name}")
    report = {"total": len(launched), "counts": dict(counts)}
    if sites:
        by_site = collections.Counter(zip(launched, sites, strict=True))
        print("by call site (the innermost frame in imf / imf_kernels, or the backward's autograd node):")
        for (name, site), count in by_site.most_common(args.sites):
            print(f"  {count:5d}  {name:28s} {site}")
        report["sites"] = [{"op": name, "site": site, "count": n} for (name, site), n in by_site.most_common()]
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
