"""Median step time of the product trainer on the paper's first 10 scenarios, at a real data size.

Builds the lower-layer cache for ``PAIRS`` counterbalanced pairs per scenario (the paper's
stimuli and weights, as ``instill_cpu.py``), then times the first 16 optimizer steps of
``selfinterp.training.finetune`` and stops. Where the shared-prefix grouping depends on the data size
(bench_finetune.md), this measures it at the size that matters.

    python benchmarks/step_time.py PAIRS [SOFT_T (0: hard labels)] [LAYERS] ['{"trainer": "settings"}']
"""

import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import instill_cpu as ic  # noqa: E402

from selfinterp import design, models  # noqa: E402
from selfinterp.training.finetune import FinetuneConfig, finetune  # noqa: E402


class _Stop(Exception):
    pass


def main() -> None:
    pairs = int(sys.argv[1])
    soft = float(sys.argv[2]) if len(sys.argv) > 2 and float(sys.argv[2]) else None
    layers = int(sys.argv[3]) if len(sys.argv) > 3 else 12
    extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    scen, w = ic.paper_scenarios(10)
    train = design.instillation_examples(scen, w, pairs, 0, "instill-cpu-train", True, label_temperature=soft)
    cfg = FinetuneConfig(**{**ic.BEST, "layers": layers, **extra})
    out = Path(tempfile.mkdtemp(prefix="step-time-"))
    secs: list[float] = []

    def record(r: dict) -> None:
        secs.append(r["seconds"])
        if len(secs) >= 16:
            raise _Stop

    try:
        finetune(models.resolve("smollm2-135m"), train, None, cfg, out, resume=False, progress=False, callback=record)
    except _Stop:
        pass
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"{len(train)} prompts, top {layers} layers, soft {soft}: median {statistics.median(secs[1:]):.2f} s/step "
          f"over {len(secs) - 1} steps (after the first)")


if __name__ == "__main__":
    main()
