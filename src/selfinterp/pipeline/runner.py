"""The runner: one config's protocol in a run directory, resumable.

The stages are :data:`selfinterp.pipeline.stages.STAGES`; the runner keeps their recorded state,
runs the ones not done, gives them the models they ask for (a backend to measure with, a trainer
to train with) and the journals their model calls go into.

Never losing work: a stage is keyed by a hash of the settings it reads and of the outputs of
the stages it needs; a finished stage whose key and output checksums still match is skipped.
Model calls are journaled as they complete (:mod:`selfinterp.journal`), so an interrupted stage
resumes without repeating them, and fine-tuning resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import design, modelref
from ..config import RunConfig, TrainSettings
from ..journal import Journal, atomic_write_json, sha256_file, sha256_json
from ..scenarios import Scenario
from .measure import report_curve_evaluator
from .plan import estimate_run
from .stages import STAGES, Stage

STAGE_FORMAT = 1  # bump when a stage's outputs change meaning, to redo old runs' stages


# --------------------------------------------------------------------------------------------
# The run


class Run:
    """The protocol for one config in a run directory: its stages, their recorded state, its models."""

    def __init__(self, config: RunConfig, root: str | Path, force: bool = False, progress: bool = True,
                 console: Any = None):
        from rich.console import Console

        self.cfg = config
        self.root = Path(root)
        self.force = force
        self.progress = progress
        self.console = console or Console(stderr=True)
        self.label = config.label
        self._design: dict[str, Any] | None = None
        self.current: str = ""  # the stage being run (for journals and models)
        self._device = None  # where this run computes (selfinterp.estimate.Device), for its estimates
        self.is_follower = False  # a rank > 0 of a multi-process launch (see _follow)
        self._outputs: list[Path] = []

    # -- bookkeeping

    def path(self, *parts: str) -> Path:
        """A path inside the run directory."""
        return self.root.joinpath(*parts)

    def stages(self) -> list[Stage]:
        """The run's stages in order (native and control ones only when the config asks for them)."""
        return [s for s in STAGES if not (s.native and self.cfg.n_native == 0)
                and not (s.control and not self.cfg.cross_model_control)]

    def _state_file(self, name: str) -> Path:
        return self.path("stages", f"{name}.json")

    def state(self, name: str) -> dict | None:
        """A stage's recorded state (key, outputs, summary...), or None if absent or corrupt."""
        p = self._state_file(name)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None  # a corrupt state file: the stage is redone

    def key(self, stage: Stage) -> str:
        """A stage's key: the hash of the settings it reads and of the outputs of the stages it needs."""
        upstream = {}
        for n in stage.needs:
            st = self.state(n)
            upstream[n] = st["output_hash"] if st else None
        return sha256_json({"stage": stage.name, "format": STAGE_FORMAT,
                            "config": self.cfg.hash_fields(*stage.fields), "needs": upstream})

    def legacy_key(self, stage: Stage) -> str | None:
        """The key this stage had when every model stage read every backend block and batch_size:
        a stage recorded under it is still valid (the old key held more, never less)."""
        if "backend" not in stage.fields:
            return None
        upstream = {n: (st["output_hash"] if (st := self.state(n)) else None) for n in stage.needs}
        fields = tuple(dict.fromkeys(stage.fields + ("simulated", "batch_size")))
        return sha256_json({"stage": stage.name, "format": STAGE_FORMAT,
                            "config": self.cfg.hash_fields(*fields, legacy=True), "needs": upstream})

    def is_done(self, stage: Stage) -> bool:
        """Whether a stage finished under its current (or legacy) key with its outputs unchanged."""
        st = self.state(stage.name)
        if not st or st.get("key") not in (self.key(stage), self.legacy_key(stage)):
            return False
        for rel, digest in st["outputs"].items():
            p = self.path(rel)
            if not p.exists() or sha256_file(p) != digest:
                self.console.print(f"[yellow]{stage.name}: {rel} is missing or changed since it was written; "
                                   f"redoing the stage[/]")
                return False
        return True

    def output(self, path: Path) -> Path:
        """Register a file the current stage produced (checksummed when the stage finishes)."""
        self._outputs.append(path)
        return path

    def journal(self, what: str) -> Journal:
        """The call journal of the current stage; its name carries the stage key, so changed
        settings never reuse stale answers."""
        key = self.key(next(s for s in STAGES if s.name == self.current))[:12]
        return Journal(self.path("journal", f"{self.current}-{what}-{key}.jsonl"))

    # -- running

    def execute(self) -> dict:
        """Run every stage that is not done; return the results (analysis/results.json).

        The run directory is locked meanwhile (:mod:`selfinterp.lock`): a second run into it
        raises :class:`~selfinterp.lock.RunLocked` instead of interleaving its writes."""
        from ..lock import lock_run

        with lock_run(self.root, note=lambda m: self.console.print(f"[yellow]{m}[/]")) as lock:
            if lock.joined:
                return self._follow(lock)
            return self._execute()

    def _follow(self, lock) -> dict:
        """A rank > 0 of a multi-process launch (torchrun, accelerate launch): rank 0 runs the
        stages and writes every file; this process joins each training stage in turn (fine-tuning
        then runs data-parallel over all ranks) once rank 0 has finished the stages before it,
        and returns when the stages it can join are over. Nothing is written here."""
        from ..lock import pid_alive

        self.is_follower = True
        local = os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost", "::1")  # rank 0's pid is ours to see
        # every stage that trains on the local trainer (the controls' too): all ranks take part in it
        trains = [s for s in self.stages() if s.train_settings(self.cfg) is not None] if self.cfg.trainer_name == "hf" else []
        for stage in trains:
            before = self.stages()[: self.stages().index(stage)]
            while not all(self.is_done(b) for b in before):  # rank 0 is still at an earlier stage
                holder = _lock_holder(lock.path)
                if local and holder is not None and not pid_alive(holder):
                    raise RuntimeError(f"rank 0 of this launch (pid {holder}) stopped before {stage.name}")
                time.sleep(1.0)
            if self.is_done(stage):
                continue
            self.current = stage.name
            self._outputs = []
            stage.fn(self)
        return {}

    def _execute(self) -> dict:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.cfg.backend in ("hf", "vllm"):
            from ..models import check_loadable, quiet_transformers

            quiet_transformers()
            check_loadable(self.cfg.model)
        if self.cfg.backend == "vllm":  # fail now, not after the first fine-tuning
            from ..backends.vllm import device_type

            device_type()
        if "openai" in (self.cfg.backend, self.cfg.trainer_name):  # the package and the key: now, not after design
            from ..openai_client import preflight

            preflight(self.cfg.openai.api_key_env, self.cfg.openai.base_url)
        if not self.is_done(self.stages()[0]):
            design.choose_scenarios(self.cfg.scenarios, self.cfg.n_instilled, self.cfg.n_native, self.cfg.seed)  # enough scenarios for the design (ScenarioError), before anything is written
        atomic_write_json(self.path("config.json"), json.loads(self.cfg.model_dump_json()))
        estimates = self._estimate()
        for stage in self.stages():
            if self.is_done(stage):
                self.console.print(f"[dim]- {stage.name}: done[/]")
                continue
            self.current = stage.name
            self._outputs = []
            self.console.print(f"[bold]> {stage.name}[/]: {stage.title}")
            t = time.time()
            summary = stage.fn(self)
            outputs = {str(p.relative_to(self.root)): sha256_file(p) for p in self._outputs}
            state = {"stage": stage.name, "key": self.key(stage), "outputs": outputs,
                     "output_hash": sha256_json(outputs), "seconds": round(time.time() - t, 2),
                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": summary}
            atomic_write_json(self._state_file(stage.name), state)
            self.console.print(f"  {stage.name} finished in {state['seconds']:.1f} s")
            self._record_rates(estimates.get(stage.name), state)
        return json.loads(self.path("analysis", "results.json").read_text())

    # -- estimates: written before the first stage (estimate.json, for the report's estimated vs
    # actual), improved by every finished stage of an hf run (the rates it achieved, kept in the
    # cache for the next estimate on this machine)

    def _estimate(self) -> dict[str, tuple]:
        if self.cfg.backend not in ("hf", "vllm"):
            return {}
        from .. import estimate as est

        try:
            self._device = est.calibrate(est.local_device())
            rows, e = estimate_run(self.cfg, self._device)
        except Exception:  # noqa: BLE001 - an estimate is never a reason for a run to fail (the design
            return {}      # stage reports bad scenarios itself)
        if not self.path("estimate.json").exists():
            atomic_write_json(self.path("estimate.json"), e.to_dict())
        from rich.markup import escape

        for problem in e.problems:  # an estimate, so a warning: the run may still fit
            self.console.print(f"[yellow]estimate: {escape(problem)} (selfinterp run --dry-run shows the plan)[/]",
                               highlight=False)
        return {r["stage"]: (r["work"], s) for r, s in zip(rows, e.stages)}

    def _record_rates(self, planned: tuple | None, state: dict) -> None:
        if planned is None or self.cfg.backend != "hf":
            return
        try:
            self._record(planned, state)
        except Exception:  # noqa: BLE001 - recording a rate is a convenience, never a failure
            pass

    def _record(self, planned: tuple, state: dict) -> None:
        from .. import estimate as est

        work, stage_est = planned
        summary = state.get("summary") or {}
        seconds = summary.get("train_seconds") or state["seconds"]
        dtype = work.autocast or work.dtype if work.kind == "train" else work.dtype
        recorded = est.read_recorded()
        score = est.rate_for("score", self._device, self.cfg.model, work.dtype, recorded).flops
        rates = est.achieved_rates(stage_est, work, seconds, summary.get("cache_seconds"), score)
        for kind, rate in rates.items():
            est.record_rate(self._device, self.cfg.model, kind, dtype, rate, f"{self.root.name}/{state['stage']}")

    # -- the design, shared by every stage

    @property
    def design(self) -> dict[str, Any]:
        """The design (design.json: scenarios, instilled weights, halves), read once."""
        if self._design is None:
            data = json.loads(self.path("design.json").read_text())
            from ..scenarios import parse

            data["instilled"] = parse(data["instilled"], "design.json:instilled")
            data["native"] = parse(data["native"], "design.json:native") if data["native"] else []
            data["weights"] = {k: np.array(v) for k, v in data["weights"].items()}
            self._design = data
        return self._design

    @property
    def all_scenarios(self) -> list[Scenario]:
        """Every scenario of the design: the instilled ones, then the native ones."""
        return self.design["instilled"] + self.design["native"]

    @property
    def k(self) -> int:
        """Attributes per scenario (one number for the whole design: the paper's file layout)."""
        ks = {s.k for s in self.all_scenarios}
        if len(ks) != 1:
            raise ValueError(f"{self.root}: the design mixes scenarios of {sorted(ks)} attributes")
        return ks.pop()

    # -- models

    def model_dir(self, which: str) -> Path:
        """The directory of the model ``which`` ("instilled", "itrained_first", ...) under models/."""
        return self.path("models", which)

    def backend(self, which: str):
        """A backend running the base model or a fine-tuned one ("instilled", "itrained_first", ...)."""
        cfg = self.cfg
        if cfg.backend == "simulated":
            from ..backends.simulated import SimulatedBackend

            ref = None if which == "base" else modelref.ModelRef("simulated", str(self.model_dir(which)))
            return SimulatedBackend(self.all_scenarios, cfg.simulated, cfg.seed, ref)
        if cfg.backend == "openai":
            from ..backends.openai_api import OpenAIBackend

            o = self.cfg.openai
            record = self.path("raw", "api", f"{self.current or 'calls'}.jsonl")
            return OpenAIBackend(self.served_name(which), **o.model_dump(exclude=set(o.NOT_THE_BACKENDS)),
                                 record_path=record, log=self._log)
        if cfg.backend == "vllm":
            from ..backends.vllm import VLLMBackend

            adapter = None if which == "base" else str(self.model_dir(which))
            return VLLMBackend(cfg.model, adapter=adapter, settings=cfg.vllm, seed=cfg.seed)
        from ..backends.hf import HFBackend

        if which == "base":
            return HFBackend(cfg.model, batch_size=cfg.batch_size, progress=False)
        ft = modelref.read_finetuned(self.model_dir(which))
        if ft.method == "lora":
            return HFBackend(ft.base_model, adapter=str(ft.adapter), batch_size=cfg.batch_size, progress=False)
        return HFBackend(str(modelref.materialise(ft.path)), batch_size=cfg.batch_size, progress=False)

    def served_name(self, which: str) -> str:
        """The model ``which`` on the OpenAI(-compatible) server: the base model, a job's fine-tuned
        model (models/<which>/manifest.json), or a served name from ``openai.models``."""
        o = self.cfg.openai
        if which == "base":
            return o.model or self.cfg.model
        if which in o.models:
            return o.models[which]
        name = json.loads((self.model_dir(which) / "manifest.json").read_text()).get("fine_tuned_model")
        if not name:
            raise ValueError(f"models/{which}/manifest.json names no fine-tuned model; set openai.models.{which}")
        return name

    def _log(self, message: str) -> None:
        self.console.print(f"  {message}", highlight=False, markup=False)

    def train(self, which: str, base: str, data: str, val: str | None, settings: TrainSettings,
              curves: dict[str, tuple[list[Scenario], dict[str, np.ndarray]]] | None = None) -> dict:
        """Fine-tune ``base`` ("base" or a fine-tuned model's name) into models/<which> with the
        run's trainer (:mod:`selfinterp.training`); the stage's summary.

        ``curves`` (local trainer, with ``report_curves``): name -> (scenarios, the weights their
        reports should match); at each of the trainer's evaluations every scenario gets one
        expected-value report, and its r is recorded as ``report_r_<name>`` in the manifest."""
        out = self.model_dir(which)
        rel = {"model": str(out.relative_to(self.root))}
        train_path = self.path("datasets", data)
        val_path = self.path("datasets", val) if val else None
        cfg = self.cfg
        if cfg.backend == "simulated":
            from ..training.simulated import SimulatedTrainer

            start = "simulated" if base == "base" else str(self.model_dir(base))
            SimulatedTrainer(self.all_scenarios, cfg.simulated, cfg.seed).fit(start, train_path, val_path, settings, out)
            return rel | self._register_model(out)
        if cfg.trainer_name == "external":  # fine-tuned elsewhere: its served name is recorded
            atomic_write_json(out / "manifest.json", {"trainer": "external", "fine_tuned_model": cfg.openai.models[which]})
            return rel | {"served_as": cfg.openai.models[which]} | self._register_model(out)
        if cfg.trainer_name == "openai":
            from ..training.openai_jobs import OpenAITrainer

            suffix = f"{cfg.openai.suffix or cfg.name}-{which}".replace("_", "-")[-40:].strip("-")
            m = OpenAITrainer(cfg.openai, cfg.seed, suffix, log=self._log).fit(
                self.served_name(base), train_path, val_path, settings, out).metadata
            return rel | {"fine_tuned_model": m["fine_tuned_model"], "job_id": m["job_id"],
                          "trained_tokens": m["trained_tokens"], "steps": m.get("steps"),
                          "final_loss": m.get("final_train_loss"), "val_loss": m.get("final_valid_loss")} \
                | self._register_model(out)
        if cfg.backend == "vllm":  # training needs the memory the engine holds
            from ..backends.vllm import release

            release()
        from .. import models
        from ..training.local import LocalTrainer

        if base == "base":
            base_path = str(models.resolve(cfg.model))
        elif self.is_follower:  # rank 0 writes the merged model; the other ranks wait for it
            base_path = str(modelref.wait_for_merged(self.model_dir(base)))
        else:
            base_path = str(modelref.materialise(self.model_dir(base)))
        fields = settings.model_dump(exclude=set(getattr(settings, "DATA", ())))  # the trainer's own settings
        if fields["batching"] == "auto":  # counterbalanced decisions come as adjacent A/B-swapped pairs
            fields["batching"] = "pairs" if cfg.counterbalance and data.startswith("instill") else "shuffle"
        fields["seed"] = cfg.seed
        if curves and "inner" in curves:  # the model kept is the best on the inner split
            fields["keep_best"] = "report_r_inner"
        evaluator = report_curve_evaluator(self, curves) if curves else None
        m = LocalTrainer(self.progress, evaluator).fit(base_path, train_path, val_path,
                                                       TrainSettings.model_validate(fields), out).metadata
        losses = [s["loss"] for s in m.get("step_losses", [])]
        return rel | {"steps": m.get("steps"), "first_loss": losses[0] if losses else None,
                      "final_loss": losses[-1] if losses else None, "val_loss": m.get("val_loss"),
                      "train_seconds": m.get("wall_seconds"), "cache_seconds": m.get("cache_seconds")} \
            | self._register_model(out)

    def _register_model(self, out: Path) -> dict:
        for name in ("manifest.json", "simulated.json"):
            if (out / name).exists():
                self.output(out / name)
        return {}


def _lock_holder(path: Path) -> int | None:
    try:
        return int(path.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


