"""Run every benchmark: ``python -m benchmarks [--json]``."""

from __future__ import annotations

import json
import sys

from benchmarks import attestation_verify, hop, load, model, unlock


def main() -> int:
    results = {
        "attestation_verify": attestation_verify.run(),
        "unlock": unlock.run(size_mb=256, rounds=3),
        "hop": hop.run(round_trips=2000, bulk_mb=64, repeats=3),
        "model": model.run(samples=200, rounds=3),
        # 4 consumers x 5 s per way, model then echo: two local systems boot (~15 s each)
        "load": load.run(consumers=4, seconds=5, progress=load.progress_to_stderr),
    }
    if "--json" in sys.argv[1:]:
        print(json.dumps(results, indent=2))
    else:
        for name, figures in results.items():
            print(f"== {name}")
            for key, value in figures.items():
                print(f"  {key:<32} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
