"""The pipeline: the paper's protocol as stages over a run directory.

- :mod:`.stages`: the stages (what each does, needs, is keyed by, and declares for the dry run);
- :mod:`.runner`: :class:`Run`, which runs the stages not done, resumably, with the models and
  trainers they ask for;
- :mod:`.measure`: a model's choices and self-reports, journaled, in the paper's CSV layout;
- :mod:`.plan`: the dry run's rows and the time and memory estimate;
- :mod:`.costs`: tokens and dollars of a run on the OpenAI API;
- :mod:`.serve`: a vLLM server for a run's models.
"""

from .measure import call_seed
from .plan import dry_run_rows, estimate_run
from .runner import Run
from .stages import STAGES, GateFailed, Stage

__all__ = ["Run", "Stage", "STAGES", "GateFailed", "call_seed", "dry_run_rows", "estimate_run"]
