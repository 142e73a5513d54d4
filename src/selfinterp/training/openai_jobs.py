"""The OpenAI trainer: fine-tuning through the API (upload the chat JSONL datasets, create a job,
poll it with backoff).

Every id is recorded in ``out_dir/openai_job.json`` as soon as it exists, so a restarted run
re-attaches to its files and job instead of uploading or training again; the result (fine-tuned
model name, trained tokens) goes into ``out_dir/manifest.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from ..journal import atomic_write_json
from ..modelref import ModelRef
from ..config import OpenAISettings, TrainSettings
from ..openai_client import Connection, FineTuneFailed, OpenAIAPIError, connect, public_url, redact

JOB_STATE = "openai_job.json"
MANIFEST = "manifest.json"


class FineTuneJob:
    """Upload -> create -> poll, with every id written to ``openai_job.json`` as soon as it exists."""

    def __init__(self, conn: Connection, model: str, out: Path, poll_interval: float = 30.0,
                 max_poll_interval: float = 300.0):
        self.conn = conn
        self.model = model
        self.out = out
        self.path = out / JOB_STATE
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval

    def load(self) -> dict:
        """The job state recorded in ``openai_job.json`` (a fresh one if absent or unreadable)."""
        if self.path.exists():
            try:
                return json.loads(self.path.read_text())
            except json.JSONDecodeError:
                pass
        return {"files": {}, "failed_jobs": []}

    def upload(self, state: dict, role: str, path: Path) -> str:
        """The id of ``path`` uploaded as ``role``, re-using a recorded upload of the same contents."""
        from ..journal import sha256_file

        digest = sha256_file(path)
        known = state["files"].get(role)
        if known and known["sha256"] == digest:
            self.conn.log(f"{role}: re-using uploaded file {known['id']} ({path.name})")
            return known["id"]

        def go():
            with open(path, "rb") as f:
                return self.conn.client.files.create(file=(path.name, f.read()), purpose="fine-tune")

        obj = self.conn.caller.call(f"upload {path.name}", go)
        state["files"][role] = {"id": obj.id, "sha256": digest, "filename": path.name, "bytes": getattr(obj, "bytes", None)}
        atomic_write_json(self.path, state)
        self.conn.log(f"{role}: uploaded {path.name} as {obj.id}")
        return obj.id

    def run(self, train: Path, val: Path | None, seed: int | None, suffix: str | None,
            hyperparameters: dict) -> ModelRef:
        """The fine-tuned model, from a new or re-attached job; its manifest is written beside the job state."""
        self.out.mkdir(parents=True, exist_ok=True)
        state = self.load()
        request: dict[str, Any] = {"model": self.model, "training_file": self.upload(state, "training_file", train)}
        if val is not None:
            request["validation_file"] = self.upload(state, "validation_file", val)
        if seed is not None:
            request["seed"] = seed
        if suffix:
            request["suffix"] = suffix
        hp = {k: v for k, v in hyperparameters.items() if v is not None}
        if hp:
            request["method"] = {"type": "supervised", "supervised": {"hyperparameters": hp}}
        job = state.get("job")
        if job and job.get("request") != request:
            self.conn.log(f"fine-tuning job {job['id']} was made for other settings or data; starting a new one")
            state.setdefault("superseded_jobs", []).append(job)
            job = None
        if job is None:
            created = self.conn.caller.call("create fine-tuning job",
                                         lambda: self.conn.client.fine_tuning.jobs.create(**request))
            job = {"id": created.id, "request": request, "status": created.status}
            state["job"] = job
            atomic_write_json(self.path, state)
            self.conn.log(f"created fine-tuning job {created.id} on {self.model}")
        else:
            self.conn.log(f"re-attaching to fine-tuning job {job['id']} ({job.get('status')})")
        done = self.poll(state)
        metrics = self.save_results(list(getattr(done, "result_files", None) or []))
        manifest = {"trainer": "openai", "base_model": self.model, "fine_tuned_model": done.fine_tuned_model,
                    "job_id": done.id, "training_file": request["training_file"],
                    "validation_file": request.get("validation_file"), "seed": getattr(done, "seed", seed),
                    "trained_tokens": done.trained_tokens, "hyperparameters": _dump(getattr(done, "hyperparameters", None)),
                    "method": _dump(getattr(done, "method", None)), "status": done.status,
                    "created_at": getattr(done, "created_at", None), "finished_at": getattr(done, "finished_at", None),
                    "result_files": list(getattr(done, "result_files", None) or []), **metrics,
                    "base_url": public_url(self.conn.base_url)}
        atomic_write_json(self.out / MANIFEST, manifest)
        return ModelRef(base=self.model, adapter=done.fine_tuned_model, metadata=manifest)

    def save_results(self, file_ids: list[str]) -> dict:
        """Download the job's result files (the API's per-step metrics CSV) next to the manifest;
        best effort: a failure is logged, not fatal (the model is trained either way)."""
        import csv
        import io

        saved, last = [], {}
        for fid in file_ids:
            try:
                data = self.conn.caller.call(f"download result file {fid}", lambda: self.conn.client.files.content(fid)).read()
            except OpenAIAPIError as e:
                self.conn.log(f"could not download the job's result file: {e}")
                continue
            from ..journal import atomic_write_text

            text = data.decode("utf-8", "replace")
            atomic_write_text(self.out / f"openai_results_{fid}.csv", text)
            saved.append(f"openai_results_{fid}.csv")
            for row in csv.DictReader(io.StringIO(text)):
                for k in ("train_loss", "valid_loss", "full_valid_loss"):
                    try:
                        if row.get(k) not in (None, ""):
                            last[k] = float(row[k])
                    except ValueError:
                        pass
                if row.get("step"):
                    last["steps"] = row["step"]
        out: dict[str, Any] = {"result_files_saved": saved}
        if "train_loss" in last:
            out["final_train_loss"] = last["train_loss"]
        if "valid_loss" in last or "full_valid_loss" in last:
            out["final_valid_loss"] = last.get("full_valid_loss", last.get("valid_loss"))
        if "steps" in last:
            out["steps"] = int(float(last["steps"]))
        return out

    def poll(self, state: dict) -> Any:
        """The succeeded job, polled with growing delays; FineTuneFailed if it fails or is cancelled."""
        job = state["job"]
        delay = self.poll_interval
        while True:
            current = self.conn.caller.call(f"fine-tuning job {job['id']}",
                                         lambda: self.conn.client.fine_tuning.jobs.retrieve(job["id"]))
            if current.status != job.get("status"):
                job["status"] = current.status
                atomic_write_json(self.path, state)
                self.conn.log(f"fine-tuning job {job['id']}: {current.status}")
            if current.status == "succeeded":
                if not current.fine_tuned_model:
                    raise OpenAIAPIError(f"fine-tuning job {job['id']} succeeded without a fine_tuned_model")
                job.update(fine_tuned_model=current.fine_tuned_model, trained_tokens=current.trained_tokens)
                atomic_write_json(self.path, state)
                return current
            if current.status in ("failed", "cancelled"):
                err = getattr(current, "error", None)
                code = getattr(err, "code", None) if err is not None else None
                message = getattr(err, "message", None) if err is not None else None
                job["error"] = {"code": code, "message": message}
                state["failed_jobs"].append(job)
                state.pop("job")
                atomic_write_json(self.path, state)
                raise FineTuneFailed(redact(
                    f"fine-tuning job {job['id']} {current.status}: {code or 'no code'}: {message or 'no message'}. "
                    "Run again to start a new job (the uploaded files are re-used).", self.conn.secrets))
            self.conn.sleep(delay)
            delay = min(self.max_poll_interval, max(delay * 1.5, 0.0))


class OpenAITrainer:
    """The :class:`~selfinterp.training.Trainer` of models on an OpenAI(-compatible) server: a
    fine-tuning job per model (resumable: it re-attaches to the recorded files and job)."""

    def __init__(self, settings: OpenAISettings, seed: int | None = None, suffix: str | None = None,
                 log: Callable[[str], None] | None = None, sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        self.seed = seed
        self.suffix = suffix
        self.log = log
        self.sleep = sleep

    def fit(self, base: str, train: Path, val: Path | None, settings: TrainSettings, out: Path) -> ModelRef:
        """Fine-tune the served model ``base`` on ``train``; the epochs are ``settings.epochs`` unless
        the ``[openai]`` block sets ``n_epochs``. The metadata is the manifest written into ``out``."""
        o = self.settings
        conn = connect(o.base_url, o.api_key_env, o.concurrency, o.max_retries, o.timeout, o.backoff,
                       sleep=self.sleep, log=self.log)
        hp = {"n_epochs": settings.epochs if o.n_epochs is None else o.n_epochs, "batch_size": o.batch_size,
              "learning_rate_multiplier": o.learning_rate_multiplier}
        job = FineTuneJob(conn, base, Path(out), o.poll_interval, o.max_poll_interval)
        return job.run(Path(train), Path(val) if val else None, self.seed, self.suffix, hp)


def _dump(x: Any) -> Any:
    if x is None:
        return None
    return x.model_dump(mode="json") if hasattr(x, "model_dump") else x
