"""``python -m tests.fuzz``: run every fuzz target (or some) and print what happened.

::

    python -m tests.fuzz                          # every target, 20,000 cases each
    python -m tests.fuzz --target frame_stream --cases 100000
    python -m tests.fuzz --seconds 10             # at most 10 s per target
    python -m tests.fuzz --list                   # the targets and what they attack
    python -m tests.fuzz --write-corpus DIR       # seeds as files, for atheris/libFuzzer

Prints one row per target (cases run, typed errors, accepted inputs, distinct accepted inputs
that are not seeds, distinct refusal messages with their values masked, the slowest case, the
mean, the growth of the peak RSS, findings), then each finding with its location and input;
exits 1 if there was any finding. Inputs of findings are saved in
the crash folder (``--crash-dir``). A run is reproducible from ``--seed``.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
import time
from pathlib import Path

from tests.fuzz.runner import Result, limit_memory, run_target, table
from tests.fuzz.targets import TARGETS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cases", type=int, default=20_000, help="inputs per target (20000)")
    parser.add_argument(
        "--seconds", type=float, default=0.0, help="at most this long per target (0: no cap)"
    )
    parser.add_argument(
        "--target", action="append", choices=sorted(TARGETS), help="this target (repeatable)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the run's random seed (0)")
    parser.add_argument(
        "--time-limit", type=float, default=None, help="seconds per input (default: per target)"
    )
    parser.add_argument(
        "--memory-mb",
        type=int,
        default=2048,
        help="address space allowed beyond the start, in MiB (0: no limit)",
    )
    parser.add_argument(
        "--crash-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "nci-fuzz",
        help="where inputs of findings are saved",
    )
    parser.add_argument(
        "--keep-accepted",
        type=Path,
        help="save accepted inputs that are not seeds here (for the authenticated formats)",
    )
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--write-corpus", type=Path, help="write each target's seeds and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = args.target or list(TARGETS)
    if args.list:
        for name in names:
            target = TARGETS[name]
            errors = ", ".join(e.__name__ for e in target.allowed) or "nothing"
            print(f"{name:24} {target.attack}; may raise {errors}")
        return 0
    if args.write_corpus is not None:
        for name in names:
            folder = args.write_corpus / name
            folder.mkdir(parents=True, exist_ok=True)
            for index, seed in enumerate(TARGETS[name].seeds()):
                (folder / f"seed-{index}").write_bytes(seed)
        print(f"wrote the seeds of {len(names)} targets to {args.write_corpus}")
        return 0
    # (1) build every seed corpus and import every parser before the memory cap applies
    for name in names:
        for seed in TARGETS[name].seeds():
            with contextlib.suppress(Exception):  # a seed that fails is reported by the run
                TARGETS[name].test_one_input(seed)
    limit_memory(args.memory_mb)
    # (2) the runs
    results: list[Result] = []
    started = time.monotonic()
    for name in names:
        results.append(
            run_target(
                name,
                TARGETS[name],
                cases=args.cases,
                seconds=args.seconds or None,
                rng=random.Random(f"{args.seed}/{name}"),
                time_limit=args.time_limit,
                crash_dir=args.crash_dir,
                keep_accepted=args.keep_accepted,
            )
        )
        row = results[-1]
        print(
            f"{name}: {row.cases} cases, {row.typed} typed errors, {row.accepted} accepted, "
            f"{len(row.findings)} findings",
            file=sys.stderr,
            flush=True,
        )
    elapsed = time.monotonic() - started
    # (3) the report
    print(table(results))
    total = sum(r.cases for r in results)
    print(f"\n{total} cases in {elapsed:.0f} s (seed {args.seed})")
    findings = [f for r in results for f in r.findings]
    for finding in findings:
        print("\n" + finding.describe())
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
