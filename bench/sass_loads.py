"""Which global loads of a Triton kernel wait for an earlier load's data before they are issued, read from the sm_90
SASS of the ahead-of-time specs on this CPU (no GPU needed: tests/test_triton_aot.py's compile, Triton's bundled
cuobjdump).

    PYTHONPATH=. python bench/sass_loads.py gn_jvp_bf16_c32          # every spec whose name contains the text
    PYTHONPATH=build/triton-3.6.0:. python bench/sass_loads.py loss_finish   # with the GPU image's Triton
    PYTHONPATH=. python bench/sass_loads.py gn_param_sums --sass      # and the loads, barriers and branches
    python bench/sass_loads.py --json loss_finish gn_param_sums       # one JSON row per spec (several names)

A load "waits" when, between the previous global load and it, an instruction read the data of a load issued before
(so the warp stalls for that data before this load is even issued: two memory latencies where one would do), or a
barrier stood (a load cannot move across one). In 2026-11-27's reading, ptxas did that in loops over 16-byte vector
loads (x consumed before dx was loaded, chunk after chunk) and before a reduction's barriers; Triton's pipelined
loops (`tl.range(..., num_stages=3)`) issue asynchronous copies to shared memory instead (LDGSTS, counted apart).
Static order only: a loop's back edge is not followed, so the first iteration is what is read. A dependent load
(an address computed from loaded data) waits by necessity; the listing says which load waited, for a human to judge.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_REGISTER = re.compile(r"\bR(\d+)\b")
_PREDICATE = re.compile(r"^@!?U?P\w+\s+")
_VECTOR_REGISTERS = {".128": 4, ".64": 2}


@dataclass
class LoadSchedule:
    """What the SASS of one kernel does with its global loads (in static order)."""

    loads: int = 0  # LDG: global loads into registers
    vector_loads: int = 0  # of which 16-byte (LDG.E.128)
    async_copies: int = 0  # LDGSTS: global -> shared copies (Triton's pipelined loops)
    waited: list[str] = field(default_factory=list)  # the loads issued after an earlier load's data was read
    after_barrier: list[str] = field(default_factory=list)  # the loads issued after a barrier that followed a load

    @property
    def waited_vector_loads(self) -> int:
        return sum(".128" in text for text in self.waited)


def instructions(sass: str) -> list[str]:
    """The instruction texts of a cuobjdump -sass listing, predicates included, in address order."""
    return [match.group(1) for line in sass.splitlines() if (match := _INSTRUCTION.search(line))]


def _without_predicate(text: str) -> str:
    return _PREDICATE.sub("", text)


def _load_registers(opcode: str, destination: str) -> set[int]:
    first = _REGISTER.search(destination)
    if first is None:
        return set()
    width = next((count for suffix, count in _VECTOR_REGISTERS.items() if suffix in opcode), 1)
    return set(range(int(first.group(1)), int(first.group(1)) + width))


def load_schedule(sass: str) -> LoadSchedule:
    """Counts the loads of one kernel's SASS and lists those that waited (see the module docstring)."""
    schedule = LoadSchedule()
    loaded: set[int] = set()  # registers holding data of a load issued so far (until overwritten)
    read_since_load = barrier_since_load = seen_load = False
    for text in instructions(sass):
        body = _without_predicate(text)
        opcode, _, operands = body.partition(" ")
        parts = [part.strip() for part in operands.split(",")]
        if opcode.startswith("LDGSTS"):
            schedule.async_copies += 1
            continue
        if opcode == "LDGDEPBAR":  # the async copies' commit, no load
            continue
        if opcode == "LDG" or opcode.startswith("LDG."):
            schedule.loads += 1
            schedule.vector_loads += ".128" in opcode
            if seen_load and read_since_load:
                schedule.waited.append(body)
            elif seen_load and barrier_since_load:
                schedule.after_barrier.append(body)
            loaded |= _load_registers(opcode, parts[0])
            read_since_load = barrier_since_load = False
            seen_load = True
            continue
        if opcode.startswith("BAR"):
            barrier_since_load = barrier_since_load or seen_load
            continue
        # every operand of a store is read; of anything else, all but the first (its destination)
        sources = parts if opcode.startswith(("ST", "RED", "ATOM")) else parts[1:]
        read = {int(number) for part in sources for number in _REGISTER.findall(part)}
        read_since_load = read_since_load or bool(read & loaded)
        # a destination overwritten is no longer a load's data
        if not opcode.startswith(("ST", "RED")) and parts and (match := _REGISTER.search(parts[0])):
            loaded.discard(int(match.group(1)))
    return schedule


def _aot_tests():
    """tests/test_triton_aot.py: the AOT specs, their sm_90 compile and cuobjdump."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import test_triton_aot
    finally:
        sys.path.pop(0)
    return test_triton_aot


def spec_sass(family_spec) -> str:
    """The sm_90 SASS of one (family, spec) of tests/test_triton_aot.family_specs()."""
    aot = _aot_tests()
    return aot.cuobjdump(aot.compile_sm90(family_spec[1]), "-sass")


def matching_specs(*texts: str) -> list:
    """(family, spec) of every ahead-of-time spec whose name contains one of `texts` (first of each name). Needs a
    process without TRITON_INTERPRET=1 when imf_kernels is imported (the interpreter's functions cannot be
    compiled): the command line removes it; tests run the command in a child process."""
    out = {}
    for family, spec in _aot_tests().family_specs():
        if any(text in spec["name"] for text in texts):
            out.setdefault(spec["name"], (family, spec))
    return list(out.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", help="text a listed spec's name contains (e.g. gn_jvp_bf16, loss_finish)")
    parser.add_argument("--sass", action="store_true", help="also print the loads, barriers and branches")
    parser.add_argument("--json", action="store_true", help="one JSON row per spec instead of the table")
    args = parser.parse_args()
    specs = matching_specs(*args.names)
    unmatched = [name for name in args.names if not any(name in spec["name"] for _, spec in specs)]
    if unmatched:
        print(f"sass_loads.py: no ahead-of-time spec name contains {', '.join(unmatched)}", file=sys.stderr)
        return 2
    import triton

    if args.json:
        for family_spec in specs:
            schedule = load_schedule(spec_sass(family_spec))
            row = {"name": family_spec[1]["name"], "triton": triton.__version__, **dataclasses.asdict(schedule)}
            print(json.dumps(row), flush=True)
        return 0

    print(f"triton {triton.__version__}, sm_90")
    print(f"{'spec':48s} {'loads':>5s} {'16B':>4s} {'async':>5s} {'waited':>6s} {'16B':>4s} {'after bar':>9s}")
    for family_spec in specs:
        sass = spec_sass(family_spec)
        schedule = load_schedule(sass)
        print(
            f"{family_spec[1]['name']:48s} {schedule.loads:5d} {schedule.vector_loads:4d} {schedule.async_copies:5d} "
            f"{len(schedule.waited):6d} {schedule.waited_vector_loads:4d} {len(schedule.after_barrier):9d}"
        )
        if args.sass:
            for text in instructions(sass):
                if re.search(r"\b(LDG|LDGSTS|DEPBAR|BAR|BRA)\b|LDG\.|LDGSTS\.", text):
                    mark = " <- waited" if _without_predicate(text) in schedule.waited else ""
                    print(f"    {text}{mark}")
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # a real compile, not the interpreter (before imf_kernels is imported)
    sys.exit(main())
