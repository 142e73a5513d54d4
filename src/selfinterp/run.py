"""The whole protocol as one resumable run.

Stages, in order (each writes its artifacts into the run directory):

 1. design              scenarios (instilled, native), roles, weights, fine-tuning datasets
 2. instill             fine-tune the base model on the preference examples
 3. validate            held-out choices of the instilled model; a gate on instillation
 4. reports_base        the base model's self-reports on the instilled scenarios (control)
 5. reports_instilled   the instilled model's self-reports
 6. itrain_first/last/all   introspection training of the instilled model on each half, and all
 7. reports_itrained_first/last   each fold's reports on the half it did not train on
 8. native_choices      the instilled model's choices on native scenarios -> native weights
 9. reports_native_instilled / reports_native_itrained   reports on native scenarios
10. analysis            the paper's table (selfinterp.analysis) -> analysis/results.json, figures
11. report              report.html

Choices and reports are written in the paper's CSV layout (plus the raw replies), so
``selfinterp analyze RUN_DIR`` works on a run exactly as on the paper's data.

Never losing work: a stage is keyed by a hash of the settings it reads and of the outputs of
the stages it needs; a finished stage whose key and output checksums still match is skipped.
Model calls are journaled as they complete (:mod:`selfinterp.journal`), so an interrupted stage
resumes without repeating them, and fine-tuning resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import analysis, design, layout, modelref, prompts, stats
from .config import RunConfig, TrainSettings
from .journal import Journal, atomic_write_json, atomic_write_text, sha256_file, sha256_json
from .report_parser import parse_report
from .scenarios import Scenario

STAGE_FORMAT = 1  # bump when a stage's outputs change meaning, to redo old runs' stages


class GateFailed(RuntimeError):
    """Instillation did not reach the configured thresholds."""


@dataclass(frozen=True)
class Stage:
    """One stage of the protocol: its name, title, needs, the settings it reads and what runs it."""

    name: str
    title: str
    needs: tuple[str, ...]
    fields: tuple[str, ...]  # the RunConfig fields the stage reads
    fn: Callable[["Run"], dict[str, Any]]
    native: bool = False     # only when the run has native scenarios
    control: bool = False    # only with cross_model_control


# --------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class ChoiceMeasurement:
    """A model's choices in one stage: the items shown (key, scenario, pair), P(A) and the
    P(A) + P(B) mass per item, and the selections CSV written."""

    file: str
    items: list[tuple[str, Scenario, design.Pair]]
    p_a: np.ndarray
    mass: np.ndarray

    def summary(self) -> dict:
        """The stage's recorded result (JSON-ready)."""
        return {"file": self.file, "n_choices": len(self.items), "a_rate": float(np.mean(self.p_a >= 0.5)),
                "mean_p_a": float(self.p_a.mean()), "mean_mass": float(self.mass.mean()),
                "min_mass": float(self.mass.min())}


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
        from .lock import lock_run

        with lock_run(self.root, note=lambda m: self.console.print(f"[yellow]{m}[/]")) as lock:
            if lock.joined:
                return self._follow(lock)
            return self._execute()

    # Stages that train on the local trainer: under a multi-process launch every rank takes part.
    TRAINING = ("instill", "itrain_first", "itrain_last", "itrain_all")

    def _follow(self, lock) -> dict:
        """A rank > 0 of a multi-process launch (torchrun, accelerate launch): rank 0 runs the
        stages and writes every file; this process joins each training stage in turn (fine-tuning
        then runs data-parallel over all ranks) once rank 0 has finished the stages before it,
        and returns when the stages it can join are over. Nothing is written here."""
        from .lock import pid_alive

        self.is_follower = True
        local = os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost", "::1")  # rank 0's pid is ours to see
        trains = [s for s in self.stages() if s.name in self.TRAINING] if self.cfg.trainer_name == "hf" else []
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
            from .models import check_loadable, quiet_transformers

            quiet_transformers()
            check_loadable(self.cfg.model)
        if self.cfg.backend == "vllm":  # fail now, not after the first fine-tuning
            from .backends.vllm import device_type

            device_type()
        if "openai" in (self.cfg.backend, self.cfg.trainer_name):  # the package and the key: now, not after design
            from .backends.openai_client import preflight

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
        from . import estimate as est

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
        from . import estimate as est

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
            from .scenarios import parse

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
            from .modelref import ModelRef
            from .backends.simulated import SimulatedBackend

            ref = None if which == "base" else ModelRef("simulated", str(self.model_dir(which)))
            return SimulatedBackend(self.all_scenarios, cfg.simulated, cfg.seed, ref)
        if cfg.backend == "openai":
            return self.openai_backend(which)
        if cfg.backend == "vllm":
            from .backends.vllm import VLLMBackend

            options = {**cfg.vllm.model_dump(), "seed": cfg.seed}
            adapter = None if which == "base" else str(self.model_dir(which))
            return VLLMBackend(cfg.model, adapter=adapter, options=options)
        from .backends.hf import HFBackend

        if which == "base":
            return HFBackend(cfg.model, batch_size=cfg.batch_size, progress=False)
        ft = modelref.read_finetuned(self.model_dir(which))
        if ft.method == "lora":
            return HFBackend(ft.base_model, adapter=str(ft.adapter), batch_size=cfg.batch_size, progress=False)
        return HFBackend(str(modelref.materialise(ft.path)), batch_size=cfg.batch_size, progress=False)

    def train(self, which: str, base: str, data: str, val: str | None, settings,
              curves: dict[str, tuple[list[Scenario], dict[str, np.ndarray]]] | None = None) -> dict:
        """Fine-tune ``base`` ("base" or a fine-tuned model's name) into models/<which>.

        ``curves`` (hf trainer, with ``report_curves``): name -> (scenarios, the weights their
        reports should match); at each of the trainer's evaluations every scenario gets one
        expected-value report, and its r is recorded as ``report_r_<name>`` in the manifest."""
        out = self.model_dir(which)
        train_path = self.path("datasets", data)
        val_path = self.path("datasets", val) if val else None
        if self.cfg.backend == "simulated":
            self.backend(base).finetune(train_path, val_path, None, out_dir=out)
            return {"model": str(out.relative_to(self.root))} | self._register_model(out)
        if self.cfg.trainer_name in ("openai", "external"):
            return self.train_openai(which, base, train_path, val_path, settings)
        if self.cfg.backend == "vllm":  # training needs the memory the engine holds
            from .backends.vllm import release

            release()
        from . import finetune as ft
        from . import models

        if base == "base":
            base_path = str(models.resolve(self.cfg.model))
        elif self.is_follower:  # rank 0 writes the merged model; the other ranks wait for it
            base_path = str(modelref.wait_for_merged(self.model_dir(base)))
        else:
            base_path = str(modelref.materialise(self.model_dir(base)))
        fields = settings.model_dump(exclude=set(getattr(settings, "DATA", ())))  # the trainer's own settings
        if fields["batching"] == "auto":  # counterbalanced decisions come as adjacent A/B-swapped pairs
            fields["batching"] = "pairs" if self.cfg.counterbalance and data.startswith("instill") else "shuffle"
        fields["seed"] = self.cfg.seed
        if curves and "inner" in curves:  # the model kept is the best on the inner split
            fields["keep_best"] = "report_r_inner"
        fc = TrainSettings.model_validate(fields)
        evaluator = _report_curve_evaluator(self, curves) if curves else None
        result = ft.finetune(base_path, train_path, val_path, fc, out, resume=True, progress=self.progress,
                             evaluator=evaluator)
        m = result.manifest
        result.model = None  # the weights are on disk: free the device for the next stage's model or engine
        ft.release_memory()
        losses = [s["loss"] for s in m.get("step_losses", [])]
        return {"model": str(out.relative_to(self.root)), "steps": m.get("steps"),
                "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
                "val_loss": m.get("val_loss"), "train_seconds": m.get("wall_seconds"),
                "cache_seconds": m.get("cache_seconds")} | self._register_model(out)

    def openai_backend(self, which: str, for_training: bool = False):
        """The model ``which`` on the OpenAI(-compatible) server: the base model, a job's fine-tuned
        model (models/<which>/manifest.json), or a served name from ``openai.models``."""
        from .backends.openai_api import OpenAIBackend

        o = self.cfg.openai
        if which == "base":
            name = o.model or self.cfg.model
        elif which in o.models:
            name = o.models[which]
        else:
            name = json.loads((self.model_dir(which) / "manifest.json").read_text()).get("fine_tuned_model")
            if not name:
                raise ValueError(f"models/{which}/manifest.json names no fine-tuned model; set openai.models.{which}")
        record = None if for_training else self.path("raw", "api", f"{self.current or 'calls'}.jsonl")
        return OpenAIBackend(name, **o.model_dump(exclude=set(o.NOT_THE_BACKENDS)), record_path=record,
                             log=lambda m: self.console.print(f"  {m}", highlight=False, markup=False))

    def train_openai(self, which: str, base: str, train_path: Path, val_path: Path | None, settings) -> dict:
        """Fine-tuning through the API (resumable: re-attaches to recorded files and jobs), or, with
        trainer 'external', recording the served name of a model fine-tuned elsewhere."""
        out = self.model_dir(which)
        o = self.cfg.openai
        if self.cfg.trainer_name == "external":
            atomic_write_json(out / "manifest.json", {"trainer": "external", "fine_tuned_model": o.models[which]})
            return {"model": str(out.relative_to(self.root)), "served_as": o.models[which]} | self._register_model(out)
        epochs = settings.epochs if o.n_epochs is None else o.n_epochs
        suffix = f"{o.suffix or self.cfg.name}-{which}".replace("_", "-")[-40:].strip("-")
        ref = self.openai_backend(base, for_training=True).finetune(
            train_path, val_path, out_dir=out, seed=self.cfg.seed, suffix=suffix,
            hyperparameters={"n_epochs": epochs, "batch_size": o.batch_size,
                             "learning_rate_multiplier": o.learning_rate_multiplier})
        m = ref.metadata
        return {"model": str(out.relative_to(self.root)), "fine_tuned_model": m["fine_tuned_model"],
                "job_id": m["job_id"], "trained_tokens": m["trained_tokens"], "steps": m.get("steps"),
                "final_loss": m.get("final_train_loss"), "val_loss": m.get("final_valid_loss")} | self._register_model(out)

    def _register_model(self, out: Path) -> dict:
        for name in ("manifest.json", "simulated.json"):
            if (out / name).exists():
                self.output(out / name)
        return {}

    # -- measuring

    def _bar(self, title: str, total: int):
        from .progress import bar

        return bar(f"  {title}", console=self.console, disable=not self.progress)

    def _call_in_batches(self, which: str, title: str, items: Sequence[tuple], journal: Journal,
                         call: Callable[[Any, Sequence[tuple]], list[dict]]) -> None:
        """``call(backend, batch)`` over the items (keyed by their first element) that the
        journal does not hold yet, recording each batch's results as soon as they arrive. The model
        is loaded only if there is something left to do."""
        todo = [it for it in items if it[0] not in journal]
        try:
            if todo:
                backend = self.backend(which)
                with self._bar(title, len(items)) as bar:
                    task = bar.add_task("", total=len(items), completed=len(items) - len(todo))
                    for start in range(0, len(todo), self.cfg.batch_size):
                        batch = todo[start:start + self.cfg.batch_size]
                        journal.record_many(zip((it[0] for it in batch), call(backend, batch)))
                        bar.update(task, advance=len(batch))
                del backend
        finally:  # also when interrupted: the journal's writer lock goes with it
            journal.close()

    def measure_choices(self, which: str, scenarios: Sequence[Scenario], n_trials: int, purpose: str,
                        counterbalance: bool, out_name: str) -> "ChoiceMeasurement":
        """Choices of a model on fresh pairs -> a selections CSV in the paper's layout."""
        items = []
        for s in scenarios:
            for i, p in enumerate(design.sample_pairs(s, n_trials, self.cfg.seed, purpose, counterbalance)):
                items.append((f"{s.id}:{i}", s, p))
        journal = self.journal("choices")

        def score(backend, batch):
            probs = backend.choice_probs([prompts.decision_chat(s, p.a, p.b) for _, s, p in batch])
            return [{"p_a": float(pa), "mass": float(m)} for pa, m in zip(probs.p_a, probs.mass)]

        self._call_in_batches(which, f"{which} model choices", items, journal, score)
        rows = []
        for k, s, p in items:
            r = journal[k]
            rows.append({"model": self.label, "scenario": s.id, "selection": "A" if r["p_a"] >= 0.5 else "B",
                         **{f"A_attribute_{j + 1}": v for j, v in enumerate(p.a)},
                         **{f"B_attribute_{j + 1}": v for j, v in enumerate(p.b)},
                         ("p_a" if self.cfg.soft_targets else "prob_a"): r["p_a"], "mass": r["mass"]})
        import pandas as pd

        path = self.path(out_name)
        atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False))
        self.output(path)
        return ChoiceMeasurement(out_name, items, np.array([journal[k]["p_a"] for k, _, _ in items]),
                                 np.array([journal[k]["mass"] for k, _, _ in items]))

    def measure_reports(self, which: str, scenarios: Sequence[Scenario], version: str, out_name: str) -> dict:
        """Self-reports of a model -> a reports CSV in the paper's layout, raw replies beside it.

        Each report is sampled with a seed of its own identity (the run's seed, the stage, the
        scenario, the report's index), so an interrupted and resumed stage, or another batch size,
        draws exactly the samples an uninterrupted run draws."""
        cfg = self.cfg
        items = []
        for s in scenarios:
            for i, p in enumerate(design.sample_pairs(s, cfg.n_reports, cfg.seed, "report")):
                items.append((f"{s.id}:{i}", s, p, i))
        journal = self.journal("reports")
        stage = self.current

        def report(backend, batch):
            chats = [prompts.introspection_chat(s, p.a, p.b) for _, s, p, _ in batch]
            if cfg.report_mode == "expected":  # no sampling: the mean (and SD) of each slot's distribution
                out = backend.expected_reports(chats, [s.attribute_names for _, s, _, _ in batch])
                return [{"text": r.text, "mode": "expected", "sd": r.sd} for r in out]
            if cfg.report_mode == "constrained":
                texts = [r.text for r in backend.constrained_reports(chats, [s.attribute_names for _, s, _, _ in batch])]
            else:
                texts = backend.generate(chats, max_new_tokens=cfg.report_max_new_tokens,
                                         temperature=cfg.report_temperature,
                                         seed=[call_seed(cfg.seed, stage, s.id, i) for _, s, _, i in batch])
            return [{"text": t, "mode": cfg.report_mode} for t in texts]

        self._call_in_batches(which, f"{which} model reports ({cfg.report_mode})", items, journal, report)
        rows, raw, reasons = [], [], {}
        for k, s, p, i in items:
            text = journal[k]["text"]
            parsed = parse_report(text, s.attribute_names)
            raw.append({"scenario": s.id, "report": i, "mode": journal[k]["mode"], "text": text, "ok": parsed.ok,
                        "reason": parsed.reason, "detail": parsed.detail,
                        **({"sd": journal[k]["sd"]} if "sd" in journal[k] else {})})
            if not parsed.ok:
                reasons[parsed.reason] = reasons.get(parsed.reason, 0) + 1
                continue
            rows.append({"explaining_model": self.label, "version": version, "scenario": s.id,
                         **{f"report_attr{j + 1}": w for j, w in enumerate(parsed.weights)},
                         **{f"A_attribute_{j + 1}": v for j, v in enumerate(p.a)},
                         **{f"B_attribute_{j + 1}": v for j, v in enumerate(p.b)}})
        import pandas as pd

        cols = ["explaining_model", "version", "scenario"] + [f"report_attr{j}" for j in range(1, 6)] + \
            [f"{o}_attribute_{j}" for o in "AB" for j in range(1, 6)]
        path = self.path(out_name)
        atomic_write_text(path, pd.DataFrame(rows, columns=cols).to_csv(index=False))
        raw_path = self.path("raw", out_name.replace(".csv", ".jsonl"))
        atomic_write_text(raw_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in raw))
        self.output(path)
        self.output(raw_path)
        return {"file": out_name, "mode": cfg.report_mode, "n_reports": len(items), "n_parsed": len(rows),
                "rejected": reasons}


def call_seed(*identity: Any) -> int:
    """The sampling seed of one model call, from what the call is (e.g. the run's seed, the stage,
    the scenario, the report's index), never from where it falls in a list of calls to do: a
    stable hash, in [0, 2**31) so that every backend and API takes it."""
    digest = hashlib.sha256("\0".join(map(str, identity)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (1 << 31)


def _lock_holder(path: Path) -> int | None:
    try:
        return int(path.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------------------------
# Stage functions


def stage_design(run: Run) -> dict:
    """Stage design: scenarios, weights -> datasets/, instilled_weights.csv, scenarios.json, design.json."""
    cfg = run.cfg
    instilled, native = design.choose_scenarios(cfg.scenarios, cfg.n_instilled, cfg.n_native, cfg.seed)
    weights = {s.id: design.draw_weights(s, cfg.seed) for s in instilled}
    first, second = design.halves(instilled)
    ds = run.path("datasets")
    counts = {
        "instill_train.jsonl": design.write_jsonl(ds / "instill_train.jsonl", design.instillation_examples(
            instilled, weights, cfg.n_train, cfg.seed, "instill-train", cfg.counterbalance,
            label_temperature=cfg.instill.label_temperature if cfg.instill.labels == "soft" else None,
            attribute_targets=cfg.instill.attribute_loss > 0)),
        "instill_val.jsonl": design.write_jsonl(ds / "instill_val.jsonl", design.instillation_examples(
            instilled, weights, cfg.n_val, cfg.seed, "instill-val", cfg.counterbalance)),
    }
    for name, part in (("all", instilled), ("first_half", first), ("second_half", second)):
        f = f"introspection_{name}.jsonl"
        counts[f] = design.write_jsonl(ds / f, design.introspection_examples(part, weights, cfg.n_introspection, cfg.seed))
    for f in counts:
        run.output(ds / f)
    design.write_weights_csv(run.path("instilled_weights.csv"), instilled, weights)
    atomic_write_json(run.path("scenarios.json"), [s.to_dict() for s in instilled + native])
    atomic_write_json(run.path("design.json"), {
        "instilled": [s.to_dict() for s in instilled], "native": [s.to_dict() for s in native],
        "weights": {k: v.tolist() for k, v in weights.items()},
        "halves": {"first": [s.id for s in first], "second": [s.id for s in second]}})
    for f in ("instilled_weights.csv", "scenarios.json", "design.json"):
        run.output(run.path(f))
    run._design = None
    return {"n_instilled": len(instilled), "n_native": len(native), "datasets": counts}


def _report_curve_evaluator(run: Run, sets: dict[str, tuple[list[Scenario], dict[str, np.ndarray]]]):
    """The trainer's evaluator for ``report_curves``: per set, one expected-value report per
    scenario (a pair of its own, the same at every evaluation) and r against the set's weights."""
    pairs = {s.id: design.sample_pairs(s, 1, run.cfg.seed, "curve")[0] for scens, _ in sets.values() for s in scens}

    def evaluate(model, tokenizer) -> dict[str, float]:
        from .backends.hf import HFBackend

        backend = HFBackend.around(model, tokenizer, batch_size=run.cfg.batch_size)
        out = {}
        for name, (scens, weights) in sets.items():
            scens = [s for s in scens if s.id in weights]
            if not scens:  # r over the cells of even one scenario is defined (k attributes)
                continue
            reps = backend.expected_reports([prompts.introspection_chat(s, pairs[s.id].a, pairs[s.id].b) for s in scens],
                                            [s.attribute_names for s in scens])
            x = np.array([[r.weights[n] for n in s.attribute_names] for r, s in zip(reps, scens)])
            out[f"report_r_{name}"] = stats.pearson(x, np.array([weights[s.id] for s in scens]))
        return out

    return evaluate


def _learned(run: Run) -> dict[str, np.ndarray]:
    """The instilled model's learned weights (from the validate stage's choices)."""
    k = run.k
    ranges = layout.read_ranges(run.path("scenarios.json"), k)
    return analysis.learn(layout.read_choices(run.path(f"{run.label}_instilled_selections.csv"), k), ranges).weights


def _inner_split(run: Run, scenarios: list[Scenario]) -> tuple[list[Scenario], list[Scenario]]:
    """introspection_stop 'inner_r': (inner training, inner validation) scenarios of a training fold,
    a seeded choice of inner_fraction of them (at least one) for validation."""
    k = max(1, round(run.cfg.inner_fraction * len(scenarios)))
    if len(scenarios) - k < 1:
        raise ValueError(f"introspection_stop 'inner_r': a fold of {len(scenarios)} scenario(s) cannot spare "
                         f"{k} for the inner split; use more instilled scenarios")
    pick = set(random.Random(f"{run.cfg.seed}:inner:{scenarios[0].id}").sample([s.id for s in scenarios], k))
    return [s for s in scenarios if s.id not in pick], [s for s in scenarios if s.id in pick]


def _introspection_data(run: Run, name: str, trained: list[Scenario]) -> tuple[str, list[Scenario], list[Scenario]]:
    """The fold's training file, and its (trained, inner) scenarios: with introspection_stop
    'inner_r' the inner scenarios' examples are left out (a file of their own under datasets/)."""
    if run.cfg.introspection_stop != "inner_r":
        return name, trained, []
    fit, inner = _inner_split(run, trained)
    sub = name.replace(".jsonl", ".inner_train.jsonl")
    rows = design.introspection_examples(fit, run.design["weights"], run.cfg.n_introspection, run.cfg.seed)
    design.write_jsonl(run.path("datasets", sub), rows)
    run.output(run.path("datasets", sub))
    return sub, fit, inner


def _fold_curves(run: Run, trained: list[Scenario], heldout: list[Scenario], inner: list[Scenario]) -> dict | None:
    if not (run.cfg.report_curves or inner):
        return None
    learned = _learned(run)
    sets = {"trained": (trained, learned), "heldout": (heldout, learned)}
    if inner:
        sets["inner"] = (inner, learned)
    return sets


def stage_instill(run: Run) -> dict:
    """Stage instill: fine-tune the base model on the preference examples into models/instilled."""
    curves = {"instilled": (run.design["instilled"], run.design["weights"])} if run.cfg.report_curves else None
    return run.train("instilled", "base", "instill_train.jsonl",
                     "instill_val.jsonl" if run.cfg.n_val else None, run.cfg.instill, curves)


def stage_validate(run: Run) -> dict:
    """Stage validate: held-out choices of the instilled model (selections CSV); the instillation gate."""
    cfg, d = run.cfg, run.design
    c = run.measure_choices("instilled", d["instilled"], cfg.n_eval_trials, "eval", cfg.eval_counterbalance,
                            f"{run.label}_instilled_selections.csv")
    m, items, p_a = c.summary(), c.items, c.p_a
    truth = np.array([design.simulated_choice(s, d["weights"][s.id], p) == "A" for _, s, p in items])
    agreement = float(np.mean((p_a >= 0.5) == truth))
    k = run.k
    ranges = layout.read_ranges(run.path("scenarios.json"), k)
    learned = analysis.learn(layout.read_choices(run.path(m["file"]), k), ranges)
    ids = [s for s in learned.weights if s in d["weights"]]
    r = stats.pearson(np.array([learned.weights[s] for s in ids]), np.array([d["weights"][s] for s in ids])) \
        if len(ids) >= 2 else float("nan")
    m.update({"agreement": agreement, "learned_vs_instilled_r": r, "n_identified": len(ids),
              "not_identified": learned.flags})
    run.console.print(f"  held-out agreement with the instilled choices {agreement:.3f}, learned-vs-instilled "
                      f"r {r:.3f} over {len(ids)} scenarios; answers A {m['a_rate']:.2f}, P(A)+P(B) {m['mean_mass']:.2f}")
    # A NaN r (fewer than 2 scenarios with identified weights) fails the gate: nothing was shown to be learned.
    ok = not cfg.gate.enabled or (agreement >= cfg.gate.min_agreement and bool(r >= cfg.gate.min_r))
    m["gate"] = {"enabled": cfg.gate.enabled, "passed": bool(ok), "min_agreement": cfg.gate.min_agreement,
                 "min_r": cfg.gate.min_r, "forced": bool(not ok and run.force)}
    if not ok and not run.force:
        atomic_write_json(run.path("stages", "validate.failed.json"), m)
        raise GateFailed(
            f"instillation did not take: held-out agreement {agreement:.3f} (gate {cfg.gate.min_agreement}), "
            f"learned-vs-instilled r {r:.3f} (gate {cfg.gate.min_r}; {len(ids)} of {len(d['instilled'])} scenarios "
            f"had identified weights), answering A {m['a_rate']:.0%} of the time. "
            "Try more examples per scenario (n_train), more epochs or a higher learning rate (instill.*), more "
            "trained layers, or counterbalance = true; see benchmarks/instill_cpu.md. Re-run with --force to "
            "continue anyway.")
    return m


def stage_reports_base(run: Run) -> dict:
    """Stage reports_base: the base model's self-reports (control) -> <label>_weight_reports.csv."""
    return run.measure_reports("base", run.design["instilled"], "base", f"{run.label}_weight_reports.csv")


def stage_reports_instilled(run: Run) -> dict:
    """Stage reports_instilled: the instilled model's self-reports -> its weight reports CSV."""
    return run.measure_reports("instilled", run.design["instilled"], "instilled",
                               f"{run.label}_instilled_weight_reports.csv")


def _halves(run: Run) -> tuple[list[Scenario], list[Scenario]]:
    return design.halves(run.design["instilled"])


def _train_on_fold(run: Run, which: str, base: str, fold: str) -> dict:
    """Introspection training of ``base`` on the first half, the second half or all instilled
    scenarios (``fold``), with the report curves and the inner split the run asks for."""
    first, second = _halves(run)
    trained, heldout, data = {"first": (first, second, "introspection_first_half.jsonl"),
                              "last": (second, first, "introspection_second_half.jsonl"),
                              "all": (run.design["instilled"], [], "introspection_all.jsonl")}[fold]
    data, fit, inner = _introspection_data(run, data, trained)
    curves = _fold_curves(run, fit, heldout, inner)
    if curves and not heldout:  # all: native scenarios' learned weights come later (native_choices)
        curves.pop("heldout")
    return run.train(which, base, data, None, run.cfg.introspection, curves)


def stage_itrain_first(run: Run) -> dict:
    """Stage itrain_first: introspection training on the first half -> models/itrained_first."""
    return _train_on_fold(run, "itrained_first", "instilled", "first")


def stage_itrain_last(run: Run) -> dict:
    """Stage itrain_last: introspection training on the second half -> models/itrained_last."""
    return _train_on_fold(run, "itrained_last", "instilled", "last")


def stage_itrain_all(run: Run) -> dict:
    """Stage itrain_all: introspection training on every instilled scenario -> models/itrained_all."""
    return _train_on_fold(run, "itrained_all", "instilled", "all")


def _fold_name(run: Run, which: str) -> str:
    first, _ = _halves(run)
    n = len(run.design["instilled"])
    return f"{run.label}_itrained_{which}_{len(first) if which == 'first' else n - len(first)}_of_{n}_weight_reports.csv"


def stage_reports_itrained_first(run: Run) -> dict:
    """Stage reports_itrained_first: reports on the second half after training on the first -> CSV."""
    _, second = _halves(run)
    return run.measure_reports("itrained_first", second, "itrained_first", _fold_name(run, "first"))


def stage_reports_itrained_last(run: Run) -> dict:
    """Stage reports_itrained_last: reports on the first half after training on the second -> CSV."""
    first, _ = _halves(run)
    return run.measure_reports("itrained_last", first, "itrained_last", _fold_name(run, "last"))


def stage_native_choices(run: Run) -> dict:
    """Stage native_choices: the instilled model's choices on native scenarios -> latent selections CSV."""
    cfg = run.cfg
    return run.measure_choices("instilled", run.design["native"], cfg.n_native_trials, "native", cfg.eval_counterbalance,
                               f"{run.label}_instilled_latent_selections.csv").summary()


def stage_reports_native_instilled(run: Run) -> dict:
    """Stage reports_native_instilled: the instilled model's reports on native scenarios -> CSV."""
    return run.measure_reports("instilled", run.design["native"], "instilled_latent",
                               f"{run.label}_instilled_latent_weight_reports.csv")


def stage_reports_native_itrained(run: Run) -> dict:
    """Stage reports_native_itrained: reports on native scenarios after training on all -> CSV."""
    n = len(run.design["instilled"])
    return run.measure_reports("itrained_all", run.design["native"], "itrained_all_latent",
                               f"{run.label}_itrained_all_{n}_latent_weight_reports.csv")


# The cross-model control: the base model (never instilled) given the same introspection training
# on the same fold and asked about the same held-out scenarios; its reports are compared with the
# *instilled* model's learned weights. If it does as well, the reports follow the scenario text,
# not the reporting model's own weights.

# With introspection_stop 'inner_r' the control is stopped by the same rule (its inner-split reports
# against the instilled model's learned weights).

def stage_itrain_control_first(run: Run) -> dict:
    """Stage itrain_control_first: the base model's introspection training on the first half."""
    return _train_on_fold(run, "control_first", "base", "first")


def stage_itrain_control_last(run: Run) -> dict:
    """Stage itrain_control_last: the base model's introspection training on the second half."""
    return _train_on_fold(run, "control_last", "base", "last")


def stage_itrain_control_all(run: Run) -> dict:
    """Stage itrain_control_all: the base model's introspection training on every instilled scenario."""
    return _train_on_fold(run, "control_all", "base", "all")


def stage_reports_control_first(run: Run) -> dict:
    """Stage reports_control_first: the control's reports on the second half -> CSV."""
    _, second = _halves(run)
    return run.measure_reports("control_first", second, "control_itrained_first",
                               _fold_name(run, "first").replace("_itrained_", "_control_itrained_", 1))


def stage_reports_control_last(run: Run) -> dict:
    """Stage reports_control_last: the control's reports on the first half -> CSV."""
    first, _ = _halves(run)
    return run.measure_reports("control_last", first, "control_itrained_last",
                               _fold_name(run, "last").replace("_itrained_", "_control_itrained_", 1))


def stage_reports_control_native(run: Run) -> dict:
    """Stage reports_control_native: the control's reports on native scenarios -> CSV."""
    n = len(run.design["instilled"])
    return run.measure_reports("control_all", run.design["native"], "control_itrained_all_latent",
                               f"{run.label}_control_itrained_all_{n}_latent_weight_reports.csv")


def stage_analysis(run: Run) -> dict:
    """Stage analysis: the paper's table -> analysis/results.json, with the figures beside it."""
    from .figures import write_all

    a = analysis.analyze(run.root, seed=run.cfg.seed)
    out = run.path("analysis")
    results = analysis.to_json(a)
    atomic_write_json(out / "results.json", results)
    run.output(out / "results.json")
    for p in write_all(a, out):
        run.output(p)
    return {"conditions": sorted(results["models"].get(run.label, {}))}


def stage_report(run: Run) -> dict:
    """Stage report: the run's report.html."""
    from .report import write_report

    path = write_report(run)
    run.output(path)
    return {"file": path.name}


_ALL = ("backend", "model", "seed")
_DESIGN = ("scenarios", "seed", "n_instilled", "n_native", "n_train", "n_val", "counterbalance", "n_introspection",
           "instill.labels", "instill.attribute_loss")
_REPORTS = ("n_reports", "report_mode", "report_max_new_tokens", "report_temperature")
_MODEL_BACKEND = ("backend", "model", "simulated", "trainer", "openai", "vllm")  # what training reads
_INFER = _MODEL_BACKEND + ("batch_size",)  # and what measuring reads (batch_size: see RunConfig.hash_fields)

# introspection_stop / inner_fraction: absent from the keys when "end" (RunConfig.hash_fields). With
# "inner_r" a training stage also reads the validate stage's choices (learned weights), which follow
# from instill's output, its declared need.
_INTROSPECTION = _MODEL_BACKEND + ("introspection", "introspection_stop", "inner_fraction")

STAGES: list[Stage] = [
    Stage("design", "scenarios, weights and fine-tuning datasets", (), _DESIGN, stage_design),
    Stage("instill", "fine-tune the base model on the preference examples", ("design",),
          _MODEL_BACKEND + ("instill",), stage_instill),
    Stage("validate", "held-out choices of the instilled model; the instillation gate", ("instill",),
          _INFER + ("n_eval_trials", "eval_counterbalance", "soft_targets", "gate"), stage_validate),
    Stage("reports_base", "the base model's self-reports (control)", ("design",), _INFER + _REPORTS,
          stage_reports_base),
    Stage("reports_instilled", "the instilled model's self-reports", ("validate",), _INFER + _REPORTS,
          stage_reports_instilled),
    Stage("itrain_first", "introspection training on the first half", ("instill",), _INTROSPECTION,
          stage_itrain_first),
    Stage("itrain_last", "introspection training on the second half", ("instill",), _INTROSPECTION,
          stage_itrain_last),
    Stage("itrain_all", "introspection training on every instilled scenario", ("instill",),
          _INTROSPECTION, stage_itrain_all, native=True),
    Stage("reports_itrained_first", "reports on the second half after training on the first", ("itrain_first",),
          _INFER + _REPORTS, stage_reports_itrained_first),
    Stage("reports_itrained_last", "reports on the first half after training on the second", ("itrain_last",),
          _INFER + _REPORTS, stage_reports_itrained_last),
    Stage("native_choices", "the instilled model's choices on native scenarios", ("validate",),
          _INFER + ("n_native_trials", "eval_counterbalance", "soft_targets"), stage_native_choices, native=True),
    Stage("reports_native_instilled", "the instilled model's reports on native scenarios", ("validate",),
          _INFER + _REPORTS, stage_reports_native_instilled, native=True),
    Stage("reports_native_itrained", "reports on native scenarios after training on all", ("itrain_all",),
          _INFER + _REPORTS, stage_reports_native_itrained, native=True),
    Stage("itrain_control_first", "control: the base model given introspection training on the first half",
          ("design",), _INTROSPECTION, stage_itrain_control_first, control=True),
    Stage("itrain_control_last", "control: the base model given introspection training on the second half",
          ("design",), _INTROSPECTION, stage_itrain_control_last, control=True),
    Stage("itrain_control_all", "control: the base model given introspection training on every instilled scenario",
          ("design",), _INTROSPECTION, stage_itrain_control_all, native=True, control=True),
    Stage("reports_control_first", "control: its reports on the second half", ("itrain_control_first",),
          _INFER + _REPORTS, stage_reports_control_first, control=True),
    Stage("reports_control_last", "control: its reports on the first half", ("itrain_control_last",),
          _INFER + _REPORTS, stage_reports_control_last, control=True),
    Stage("reports_control_native", "control: its reports on native scenarios", ("itrain_control_all",),
          _INFER + _REPORTS, stage_reports_control_native, native=True, control=True),
    Stage("analysis", "the paper's table, figures", (
        "validate", "reports_base", "reports_instilled", "reports_itrained_first", "reports_itrained_last",
        "native_choices", "reports_native_instilled", "reports_native_itrained", "reports_control_first",
        "reports_control_last", "reports_control_native"), ("seed",), stage_analysis),
    Stage("report", "report.html", ("analysis",), ("name",), stage_report),
]


# --------------------------------------------------------------------------------------------
# The plan (--dry-run)


CHARS_PER_TOKEN = 3.2  # SmolLM2's and Qwen2.5's tokenizers on the paper's prompts (one token per digit)


def _tokens(chat: Sequence[dict]) -> float:
    return 3 + sum(5 + len(m["content"]) / CHARS_PER_TOKEN for m in chat)


def prompt_sizes(cfg: RunConfig) -> dict[str, float]:
    """Mean tokens of the run's decision prompt, introspection prompt and report answer, from the
    run's own scenarios (up to 10 of them), about 3.2 characters a token."""
    instilled, native = design.choose_scenarios(cfg.scenarios, cfg.n_instilled, cfg.n_native, cfg.seed)
    dec, intro, ans = [], [], []
    for s in (instilled + native)[:10]:
        p = design.sample_pairs(s, 1, cfg.seed, "estimate")[0]
        dec.append(_tokens(prompts.decision_chat(s, p.a, p.b)))
        intro.append(_tokens(prompts.introspection_chat(s, p.a, p.b)))
        ans.append(len(prompts.report_json(s, design.draw_weights(s, cfg.seed))) / CHARS_PER_TOKEN + 2)
    return {"decision": float(np.mean(dec)), "introspection": float(np.mean(intro)), "answer": float(np.mean(ans))}


def dry_run_rows(cfg: RunConfig, device: Any = None) -> list[dict[str, Any]]:
    """Stages with their model calls and training examples. Each row: stage, model_calls,
    call_kind, training_examples, epochs and, for a local model (hf, vllm), ``work``: what the
    estimator (``selfinterp.estimate``) needs, sized for ``device`` (this machine by default)."""
    from . import estimate as est

    n_i, n_n = cfg.n_instilled, cfg.n_native
    half = (n_i + 1) // 2
    cb = 2 if cfg.counterbalance else 1
    ecb = 2 if cfg.eval_counterbalance else 1
    rows = [
        ("design", 0, 0, None),
        ("instill", 0, n_i * cfg.n_train * cb, cfg.instill),
        ("validate", n_i * cfg.n_eval_trials * ecb, 0, None),
        ("reports_base", n_i * cfg.n_reports, 0, None),
        ("reports_instilled", n_i * cfg.n_reports, 0, None),
        ("itrain_first", 0, half * cfg.n_introspection, cfg.introspection),
        ("itrain_last", 0, (n_i - half) * cfg.n_introspection, cfg.introspection),
        ("itrain_all", 0, n_i * cfg.n_introspection, cfg.introspection),
        ("reports_itrained_first", (n_i - half) * cfg.n_reports, 0, None),
        ("reports_itrained_last", half * cfg.n_reports, 0, None),
        ("native_choices", n_n * cfg.n_native_trials * ecb, 0, None),
        ("reports_native_instilled", n_n * cfg.n_reports, 0, None),
        ("reports_native_itrained", n_n * cfg.n_reports, 0, None),
        ("itrain_control_first", 0, half * cfg.n_introspection, cfg.introspection),
        ("itrain_control_last", 0, (n_i - half) * cfg.n_introspection, cfg.introspection),
        ("itrain_control_all", 0, n_i * cfg.n_introspection, cfg.introspection),
        ("reports_control_first", (n_i - half) * cfg.n_reports, 0, None),
        ("reports_control_last", half * cfg.n_reports, 0, None),
        ("reports_control_native", n_n * cfg.n_reports, 0, None),
        ("analysis", 0, 0, None),
        ("report", 0, 0, None),
    ]
    native = {s.name for s in STAGES if s.native}
    control = {s.name for s in STAGES if s.control}
    local = cfg.backend in ("hf", "vllm")
    sizes = prompt_sizes(cfg) if local else {}
    device = device or (est.cpu_device() if local else None)
    gpu = device is not None and device.kind == "cuda"
    infer_dtype = ("bfloat16" if gpu else "float32") if cfg.backend == "hf" else (
        cfg.vllm.dtype if cfg.vllm.dtype != "auto" else ("bfloat16" if gpu else "float32"))
    out = []
    for name, calls, examples, train in rows:
        if (n_n == 0 and name in native) or (name in control and not cfg.cross_model_control):
            continue
        kind = "choice" if name in ("validate", "native_choices") else "report_" + cfg.report_mode if calls else None
        work = est.Work(name, "none")
        if local and calls:
            if kind == "choice":
                work = est.Work(name, "score", calls, sizes["decision"], batch_size=cfg.batch_size, dtype=infer_dtype)
            elif kind == "report_expected":  # per slot: the prompt so far, then ~a prompt's worth of short rows
                work = est.Work(name, "score", calls * 2 * 5, sizes["introspection"], batch_size=1, dtype=infer_dtype)
            else:
                work = est.Work(name, "generate", calls, sizes["introspection"],
                                new_tokens=min(sizes["answer"], cfg.report_max_new_tokens), batch_size=cfg.batch_size,
                                dtype=infer_dtype)
        elif local and train is not None:
            tokens = sizes["decision"] + 2 if name == "instill" else sizes["introspection"] + sizes["answer"]
            big = (est.find_shape(cfg.model) or est.KNOWN_SHAPES["smollm2-135m"]).params > 1e9
            ckpt = train.gradient_checkpointing if train.gradient_checkpointing is not None else (gpu and big)
            work = est.Work(name, "train", examples, tokens, epochs=train.epochs, method=train.method,
                            layers=train.layers, lora_rank=train.lora_rank,
                            cached=train.cache_lower_layers and train.first_layer != 0,  # early: nothing below
                            batch_size=max(1, train.batch_size // train.grad_accum), checkpointing=ckpt,
                            dtype=train.dtype if train.dtype != "auto" else ("bfloat16" if gpu else "float32"),
                            # the trainer drops bf16 autocast where the CPU would emulate it
                            autocast=train.autocast if gpu or device.native_bf16 else None,
                            cache_dtype=train.cache_dtype)
        out.append({"stage": name, "model_calls": calls, "call_kind": kind or "", "training_examples": examples,
                    "epochs": train.epochs if train is not None else 0, "est_seconds": 0.0, "est_gib": 0.0,
                    "work": work})
    return out


def estimate_run(cfg: RunConfig, device: Any = None, recorded: dict | None = None,
                 calibrate: bool = False) -> tuple[list[dict[str, Any]], Any]:
    """``dry_run_rows``' rows with ``est_seconds`` and ``est_gib`` filled in, and the Estimate (None when
    the run has no local model: the API's plan prices tokens instead). ``device``: this machine's
    by default; ``calibrate``: measure a CPU's matmul rate first (about a second)."""
    from . import estimate as est

    if cfg.backend not in ("hf", "vllm"):
        return dry_run_rows(cfg, device), None
    device = device or est.local_device()
    if calibrate:
        device = est.calibrate(device)
    rows = dry_run_rows(cfg, device)
    e = est.estimate([r["work"] for r in rows], device, cfg.model,
                     recorded=est.read_recorded() if recorded is None else recorded)
    for row, s in zip(rows, e.stages):
        row["est_seconds"], row["est_gib"] = s.seconds, s.device_gib
    return rows, e
