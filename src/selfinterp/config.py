"""The configuration of an experiment run, its presets, and how it is read from files.

A run is the whole protocol for one model (see :mod:`selfinterp.pipeline`). Everything that changes
its results is a field here, validated on load with messages that name the field; the stages
hash the fields they depend on, so changing one re-runs only what is downstream of it.

Presets:

- ``smoke``: every stage on the embedded default model, a handful of scenarios, minutes on a
  2-core CPU. Its numbers mean nothing; it proves the machinery.
- ``cpu``: the CPU recipe from ``benchmarks/instill_cpu.md``, sized to show instillation on a
  2-core CPU in about 1-2 hours.
- ``paper``: the paper's design (100 instilled + 100 native scenarios, 50 + 10 examples,
  50 / 100 choice trials, 10 reports per scenario, 2 folds + all), for GPUs or APIs.
- ``simulated``: the paper's design on the simulated backend (known answers, seconds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Strict(BaseModel):
    """A settings model that refuses unknown fields and cannot be changed once made."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# Attention and MLP projections of Llama/Qwen/Mistral/Gemma-style decoders.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainSettings(Strict):
    """Every setting of one run of the local trainer (``finetune.finetune`` reads this model as is;
    a run's ``[instill]`` and ``[introspection]`` blocks are made of it)."""

    method: Literal["lora", "full"] = "lora"
    # Embeddings and the LM head stay frozen in both methods: they are tied in the small models,
    # and training them would change the input of every layer (and defeat the lower-layer cache).
    layers: Optional[int] = Field(None, ge=1, description="train only the top k decoder layers (None: all)")
    first_layer: Optional[int] = Field(
        None, ge=0, description="with layers = k: the first trained layer (None: the top k; 0: the first k, "
        "early placement, which the lower-layer cache cannot speed up; i: layers i..i+k-1); the final norm "
        "is trained only with the top k")
    lora_rank: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: tuple[str, ...] = Field(DEFAULT_LORA_TARGETS, min_length=1)
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="after the linear warm-up")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1, description="examples per optimizer step over all processes, so a setting "
                            "means the same optimisation on one CPU or eight GPUs; each process takes "
                            "batch_size / world_size of them, in grad_accum micro-batches (for memory only)")
    grad_accum: int = Field(1, ge=1)
    grad_clip: Optional[float] = Field(1.0, gt=0, description="gradient-norm clip (None: off)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not on norms and biases)")
    seed: int = Field(0, exclude=True, description="the trainer's seed (set by a run to its own seed, so not in "
                      "[instill]; excluded from dumps, recorded by to_dict)")
    max_length: int = Field(1024, ge=16, description="longer examples are an error, never silently truncated")
    cache_lower_layers: bool = Field(
        False, description="with layers = k: run the frozen lower layers once per example and train the top k on "
        "the stored hidden states (identical logits, checked on the first batch); CPU memory: examples x tokens "
        "x hidden x 4 bytes (float32) or 2 (bfloat16, which rounds the cache)")
    cache_dtype: Literal["float32", "bfloat16"] = "float32"
    share_prefix: bool = Field(True, description="with the cache: run each scenario's shared prompt prefix "
                               "through the frozen layers once (exact)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the frozen weights' dtype in training; auto: bfloat16 on a GPU that has it (half "
        "the memory; trained layers and LoRA adapters stay float32), float32 elsewhere (with bf16 autocast, "
        "the fastest on a CPU)")
    gradient_checkpointing: Optional[bool] = Field(
        None, description="recompute activations in the backward pass (less memory, ~30% more compute); None: "
        "on for models over 1B parameters on a GPU")
    autocast: Optional[Literal["bfloat16", "float16"]] = Field(
        "bfloat16", description="None: compute in dtype; bfloat16 is dropped on a CPU that would emulate it")
    loss_on: Literal["answer", "answer_and_eot"] = Field(
        "answer", description="the loss on the answer's tokens only, or also on the end-of-turn marker")
    attribute_loss: float = Field(
        0.0, ge=0, description="weight of an auxiliary loss (0: off, as the paper): a linear read-out of the answer "
        "position, discarded afterwards, trained to predict each row's attribute_targets (for decisions: the "
        "options' range-normalised attribute differences; the design writes them into the instillation set)")
    attribute_head_lr: Optional[float] = Field(
        None, gt=0, description="learning rate of the attribute_loss read-out (None: lr); zero-initialised, it "
        "passes no gradient into the model until its weights grow, so a faster read-out starts teaching sooner")
    batching: Literal["auto", "shuffle", "pairs", "grouped_pairs"] = Field(
        "auto", description="shuffle examples one by one, or keep each counterbalanced pair (examples 2i and "
        "2i+1, the same options with A and B swapped) in one batch, so every batch is 50/50 A/B (grouped_pairs: "
        "and draw each batch from groups_per_batch scenarios); auto: a run picks pairs when its design is "
        "counterbalanced, else shuffle (the trainer alone: shuffle)")
    groups_per_batch: int = Field(2, ge=1)
    eval_every: Optional[int] = Field(None, ge=1, description="optimizer steps between held-out evaluations "
                                      "(validation loss and answer accuracy, in the manifest and the report)")
    early_stop_patience: Optional[int] = Field(None, ge=1, description="stop when this many evaluations in a "
                                               "row bring no better held-out accuracy (needs eval_every; off by default)")
    keep_best: Optional[str] = Field(None, exclude=True, description="an evaluator's number to maximise: the weights "
                                     "of its best evaluation are the result (set by a run for introspection_stop = "
                                     "'inner_r'; excluded from dumps, recorded by to_dict)")
    log_with: Optional[str] = Field(None, description="also log to accelerate's trackers: 'tensorboard', 'wandb', ...")
    checkpoint_every: Optional[int] = Field(100, ge=1, description="optimizer steps between checkpoints "
                                            "(also one per epoch); what an interruption can lose at most")
    keep_checkpoints: int = Field(1, ge=1, description="older checkpoints are deleted once a newer one is complete")

    # Settings that cannot change a result: left out of stage keys.
    OPERATIONAL: ClassVar[tuple[str, ...]] = ("checkpoint_every", "eval_every", "log_with", "keep_checkpoints")
    # Set by the run (its seed; the introspection stop rule), never read from a file.
    RUN_SET: ClassVar[tuple[str, ...]] = ("seed", "keep_best")

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _modules_as_tuple(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSettings":
        if self.first_layer is not None and self.layers is None:
            raise ValueError("first_layer needs layers = k (how many layers to train from it)")
        if self.cache_lower_layers and self.layers is None:
            raise ValueError("cache_lower_layers needs layers = k: with every layer trained there is nothing to cache")
        if self.batching in ("pairs", "grouped_pairs") and self.batch_size % 2:
            raise ValueError(f"batching {self.batching!r} keeps pairs together: batch_size must be even, not {self.batch_size}")
        if self.early_stop_patience is not None and not self.eval_every:
            raise ValueError("early_stop_patience needs eval_every (the evaluations it watches)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict, the run-set ones included (what a manifest records)."""
        return json.loads(self.model_dump_json()) | self._run_set()

    def _run_set(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.RUN_SET}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainSettings":
        """The settings that a dict of them describes (as :meth:`to_dict` gives them)."""
        return cls.model_validate(d)


class InstillSettings(TrainSettings):
    """Instillation: the trainer's settings and how its examples are labelled."""

    labels: Literal["hard", "soft"] = Field(
        "hard", description="'hard': the simulated choice, as the paper trained; 'soft': the target is "
        "P(A) = sigmoid((u_A - u_B) / label_temperature), a near-tie taught as one (hf trainer only)")
    label_temperature: float = Field(10.0, gt=0, description="utility units (weights in -100..100) per "
                                     "logit of the soft target")
    # Read by the design stage (they make the datasets), not by the trainer.
    DATA: ClassVar[tuple[str, ...]] = ("labels", "label_temperature")


class SimulatedSettings(Strict):
    """The simulated decision-maker (see :mod:`selfinterp.backends.simulated`)."""

    choice_noise: float = Field(10.0, gt=0, description="logistic scale on utility differences (weights in -100..100)")
    position_bias: float = Field(0.0, description="log-odds added to answering A")
    fidelity: float = Field(0.9, ge=0, le=1, description="how far fine-tuning moves the weights to those in the data")
    report_noise: float = Field(250.0, ge=0, description="sd of the noise added to each reported weight (before clipping to -100..100)")
    report_bias: float = Field(0.0, description="constant added to each reported weight")
    introspection_gain: float = Field(0.5, gt=0, le=1, description="report noise multiplier after introspection training")
    report_access: float = Field(1.0, ge=0, le=1, description="how much of its own weights a report reflects: "
                                 "reports centre on access x true + (1 - access) x weights unrelated to its choices "
                                 "(0: a model with no introspective access)")
    call_delay: float = Field(0.0, ge=0, description="seconds per model call (to test interruption)")


class OpenAIPrice(Strict):
    """USD per million tokens (``ft_*``: calling a model fine-tuned from this one)."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    training: float = Field(0.0, ge=0)
    ft_input: Optional[float] = Field(None, ge=0)
    ft_output: Optional[float] = Field(None, ge=0)


class OpenAISettings(Strict):
    """The OpenAI API or any OpenAI-compatible server (see :mod:`selfinterp.backends.openai_api`).
    The API key is read from the environment variable ``api_key_env``, never from a file."""

    base_url: str = Field("https://api.openai.com/v1", pattern=r"^https?://", description="the server's /v1 URL")
    model: Optional[str] = Field(None, min_length=1, description="the base model's name on the server (default: model)")
    models: dict[Literal["instilled", "itrained_first", "itrained_last", "itrained_all"], str] = Field(
        default_factory=dict, description="served names of fine-tuned models made by another trainer")
    api_key_env: str = Field("OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                             description="the environment variable that holds the API key")
    concurrency: int = Field(8, ge=1, le=256, description="requests in flight at once")
    max_retries: int = Field(6, ge=0, description="retries of a request on 429, 5xx, timeouts")
    timeout: float = Field(120.0, gt=0, description="seconds per request")
    backoff: float = Field(1.0, ge=0, description="first retry delay in seconds (doubles per retry)")
    choice_method: Literal["logprobs", "sample", "greedy"] = Field(
        "logprobs", description="P(A) from top-20 logprobs, from n samples at temperature 1, or one greedy answer (the paper)")
    n_samples: int = Field(20, ge=1, description="samples per choice when choice_method = 'sample'")
    response_format: Literal["none", "json_object"] = Field("none", description="response_format of free reports")
    n_epochs: Optional[int | Literal["auto"]] = Field(
        None, description="fine-tuning epochs (None: instill.epochs / introspection.epochs; 'auto': the API's choice)")
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"
    suffix: Optional[str] = Field(None, max_length=40, description="prefix of the fine-tuned models' suffixes (default: the run name)")
    poll_interval: float = Field(30.0, ge=0, description="seconds between polls of a fine-tuning job (grows 1.5x)")
    max_poll_interval: float = Field(300.0, ge=0)
    prices: dict[str, OpenAIPrice] = Field(default_factory=dict, description="override or extend the price table")

    # Read by the fine-tuning jobs and the cost estimate, not by the backend that calls a model.
    NOT_THE_BACKENDS: ClassVar[tuple[str, ...]] = ("model", "models", "prices", "n_epochs", "batch_size",
                                                   "learning_rate_multiplier", "suffix", "poll_interval",
                                                   "max_poll_interval")

    @model_validator(mode="after")
    def _no_credentials_in_url(self) -> "OpenAISettings":
        from urllib.parse import urlsplit

        parts = urlsplit(self.base_url)
        if parts.username or parts.password or "key=" in parts.query.lower():
            raise ValueError("openai.base_url must not carry credentials (they would be saved with the run); "
                             "put the key in the environment variable named by openai.api_key_env")
        return self

    # Settings that cannot change a result (how to talk to the server): left out of stage keys.
    OPERATIONAL: ClassVar[tuple[str, ...]] = ("api_key_env", "concurrency", "max_retries", "timeout", "backoff", "poll_interval",
                   "max_poll_interval", "prices")


class VLLMSettings(Strict):
    """The vLLM engine (``backend = "vllm"``, see :mod:`selfinterp.backends.vllm`); None: chosen by device."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU (like the hf backend), bfloat16 on GPU")
    head_dtype: Literal["float32", "model"] = Field(
        "float32", description="the lm_head's dtype (float32: P(A) not rounded by bfloat16 logits; model: as dtype)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model replica (tensor parallelism)")
    pipeline_parallel_size: int = Field(1, ge=1, description="pipeline stages (e.g. one per node)")
    max_model_len: Optional[int] = Field(4096, ge=64, description="context length the KV cache is sized for")
    enforce_eager: Optional[bool] = Field(None, description="skip graph capture/compilation (default: on CPU)")
    gpu_memory_utilization: Optional[float] = Field(
        None, gt=0, le=1, description="share of GPU memory vLLM takes (on CPU: of RAM it checks is free); default 0.85 GPU, 0.3 CPU")
    enable_prefix_caching: bool = True
    adapters: Literal["auto", "lora", "merged"] = Field(
        "auto", description="LoRA adapters served by LoRARequest or merged first (auto: lora on GPU, merged on CPU)")
    max_lora_rank: Optional[int] = Field(None, ge=1, description="None: the adapter's own rank (rounded up to a "
                                         "size vLLM accepts); larger values only enlarge vLLM's LoRA buffers")
    max_num_seqs: Optional[int] = Field(None, ge=1)
    cpu_kvcache_gb: Optional[float] = Field(None, gt=0, description="KV cache on CPU, GiB (VLLM_CPU_KVCACHE_SPACE)")
    distributed_executor_backend: Optional[Literal["mp", "ray"]] = None

    # Settings that cannot change a result (how fast, where): left out of stage keys.
    OPERATIONAL: ClassVar[tuple[str, ...]] = (
        "tensor_parallel_size", "pipeline_parallel_size", "max_model_len", "enforce_eager", "gpu_memory_utilization",
        "enable_prefix_caching", "max_lora_rank", "max_num_seqs", "cpu_kvcache_gb", "distributed_executor_backend")


class Gate(Strict):
    """Thresholds instillation must reach before the run spends time on reports."""

    enabled: bool = True
    min_agreement: float = Field(0.6, ge=0, le=1, description="held-out agreement with the simulated choices")
    min_r: float = Field(0.3, ge=-1, le=1, description="learned-vs-instilled Pearson r")


def _check_file_name(v: str, what: str) -> str:
    bad = [c for c in ("/", "\\", ":") if c in v]
    if bad or v.strip() in (".", "..") or v != v.strip() or any(ord(c) < 32 or ord(c) == 127 for c in v):
        why = f"contains {' and '.join(repr(c) for c in bad)}" if bad else "is not a plain name"
        raise ValueError(f"{v!r} {why}; it is {what}: one plain name without '/', '\\', ':', '..' or "
                         f"control characters, e.g. 'my-run'")
    return v


class RunConfig(Strict):
    """Every setting of one run of the protocol on one model, validated on load."""

    name: str = Field("run", min_length=1)
    preset: Optional[str] = None
    backend: Literal["hf", "simulated", "openai", "vllm"] = Field("hf", description="the inference engine")
    trainer: Optional[Literal["hf", "simulated", "openai", "external"]] = Field(
        None, description="who fine-tunes (default: the backend); 'external': models named in openai.models")
    model: str = Field("smollm2-135m", min_length=1,
                       description="registry name, local HF directory or hub id (ignored by 'simulated')")
    model_label: Optional[str] = Field(None, description="name used in output file names (default: derived from model)")
    scenarios: str = Field("bank", description="'bank' (bundled) or a scenario file")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    n_instilled: int = Field(100, ge=2)
    n_native: int = Field(100, ge=0)
    n_train: int = Field(50, ge=1, description="preference examples per instilled scenario")
    n_val: int = Field(10, ge=0)
    counterbalance: bool = Field(False, description="also train on every pair with A and B swapped")
    n_eval_trials: int = Field(50, ge=2, description="choices per instilled scenario to measure learned weights")
    n_native_trials: int = Field(100, ge=2, description="choices per native scenario")
    eval_counterbalance: bool = Field(False, description="measure every pair in both orders")
    soft_targets: bool = Field(False, description="fit learned weights on P(A) instead of the argmax choice")
    n_reports: int = Field(10, ge=1, description="self-reports per scenario and condition")
    report_mode: Literal["free", "constrained", "expected"] = Field(
        "free", description="free: the model writes the JSON; constrained: the tool writes the skeleton and the model "
        "picks each number; expected: the constrained skeleton, each number the mean of the model's distribution "
        "over -100..100 (no sampling; hf and simulated backends)")
    cross_model_control: bool = Field(
        False, description="also give the base model (never instilled) the same introspection training on each "
        "fold and compare its held-out reports with the instilled model's learned weights: reports that come "
        "from the scenario text, not from the model's own weights, do as well there")
    report_curves: bool = Field(
        False, description="at each of the trainer's evaluations (eval_every, epoch ends; hf trainer) record report "
        "accuracy: one expected-value report per scenario, r against the learned weights on the trained and the "
        "held-out fold (instillation: against the instilled weights); plotted in report.html. Does not change "
        "training; set it before the training stages run")
    introspection_stop: Literal["end", "inner_r"] = Field(
        "end", description="which introspection-trained model to keep: the last step's (the paper), or the one "
        "whose expected-value reports track the learned weights best on an inner split of the training fold "
        "(inner_fraction of its scenarios, left out of its training; never the test fold); hf trainer")
    inner_fraction: float = Field(0.2, gt=0, lt=1, description="introspection_stop 'inner_r': the share of the "
                                  "training fold's scenarios held out to choose the stopping point")
    report_max_new_tokens: int = Field(96, ge=8)
    report_temperature: float = Field(0.0, ge=0)
    n_introspection: int = Field(50, ge=1, description="introspection-training examples per scenario")
    batch_size: int = Field(16, ge=1, description="prompts per forward pass")
    instill: InstillSettings = InstillSettings()
    introspection: TrainSettings = TrainSettings(epochs=2)
    simulated: SimulatedSettings = SimulatedSettings()
    gate: Gate = Gate()
    openai: OpenAISettings = OpenAISettings()
    vllm: VLLMSettings = VLLMSettings()

    @field_validator("name")
    @classmethod
    def _name_is_one_folder(cls, v: str) -> str:
        """A run's name is its folder under runs/: one plain path component, never a way out."""
        return _check_file_name(v, "the run's folder under runs/")

    @field_validator("model_label")
    @classmethod
    def _label_is_a_file_name_part(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _check_file_name(v, "the start of the run's file names")

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        trainer = self.trainer_name
        allowed = {"hf": ("hf",), "simulated": ("simulated",), "openai": ("openai", "hf", "external"),
                   "vllm": ("hf",)}[self.backend]
        if trainer not in allowed:
            raise ValueError(f"trainer {trainer!r} cannot serve backend {self.backend!r} (use {' or '.join(allowed)})")
        if self.backend == "openai" and trainer != "openai":
            needed = ["instilled", "itrained_first", "itrained_last"] + (["itrained_all"] if self.n_native else [])
            missing = [n for n in needed if n not in self.openai.models]
            if missing:
                raise ValueError(f"openai.models: with trainer {trainer!r} the server's names of the fine-tuned "
                                 f"models are needed; missing {', '.join(missing)}")
        if not self.counterbalance and self.instill.batching in ("pairs", "grouped_pairs"):
            raise ValueError(f"instill.batching {self.instill.batching!r} keeps counterbalanced pairs together: "
                             "set counterbalance = true, or batching = 'shuffle'")
        if self.instill.labels == "soft" and trainer not in ("hf", "simulated"):
            raise ValueError(f"instill.labels 'soft' needs the hf trainer (trainer {trainer!r} learns from "
                             "the answer text only); use labels = 'hard'")
        if self.instill.attribute_loss > 0 and trainer not in ("hf", "simulated"):
            raise ValueError(f"instill.attribute_loss needs the hf trainer (trainer {trainer!r} learns from the "
                             "answer text only); use attribute_loss = 0")
        for block in ("instill", "introspection"):
            given = sorted(set(TrainSettings.RUN_SET) & getattr(self, block).model_fields_set)
            if given:
                raise ValueError(f"{block}.{given[0]}: set by the run (its seed; introspection_stop), not in [{block}]")
        if self.introspection.attribute_loss > 0:
            raise ValueError("introspection.attribute_loss: introspection examples have no attribute targets; use 0")
        if self.introspection.batching in ("pairs", "grouped_pairs"):
            raise ValueError("introspection.batching: introspection examples are not A/B pairs; use 'auto' or 'shuffle'")
        if self.backend == "simulated" and self.report_mode == "constrained":
            raise ValueError("report_mode 'constrained' needs a model backend; the simulated one reports freely")
        if self.introspection_stop == "inner_r" and (self.backend != "hf" or trainer != "hf"):
            raise ValueError("introspection_stop 'inner_r' reads the model while it trains: it needs backend 'hf' "
                             "and the hf trainer")
        if self.report_curves and (self.backend != "hf" or trainer != "hf"):
            raise ValueError("report_curves reads the model while it trains: it needs backend 'hf' and the hf trainer")
        if self.report_mode == "expected" and self.backend not in ("hf", "simulated"):
            raise ValueError(f"report_mode 'expected' reads the model's probabilities of every number, which the "
                             f"{self.backend} backend does not give; use backend 'hf', or report_mode 'constrained'")
        return self

    @property
    def trainer_name(self) -> str:
        """Who fine-tunes: ``trainer`` when set, else hf for the vllm backend and the backend itself otherwise."""
        return self.trainer or ("hf" if self.backend == "vllm" else self.backend)

    @property
    def label(self) -> str:
        """The model's name in output files (the paper's layout starts every file with it)."""
        if self.model_label:
            return self.model_label
        if self.backend == "simulated":
            return "simulated"
        return Path(self.model).name.replace("_", "-") or "model"

    def hash_fields(self, *names: str, legacy: bool = False) -> dict[str, Any]:
        """The values of the named fields, as the stage keys see them (settings that cannot change
        a result, like how often to checkpoint, are left out so that changing them redoes nothing).

        A backend's block counts only where that backend (or trainer) reads it. ``batch_size`` (how
        many prompts go to the model per call) counts only where it can change a result: the hf
        backend pads a batch into one forward, so P(A) moves with the batch's make-up at the level
        of float rounding (and a greedy report can flip on a near-tie), and vLLM's batched kernels
        likewise; the simulated backend draws per chat from the chat's own seed and the openai one
        sends one request per chat, so there it changes nothing (tests/test_stage_keys.py).
        ``legacy``: the keys before this rule (every block, batch_size everywhere), so that stages
        recorded under them are still recognised (:meth:`selfinterp.pipeline.Run.is_done`)."""
        unused = {"openai": self.backend != "openai" and self.trainer_name != "openai", "vllm": self.backend != "vllm"}
        if not legacy:
            unused["simulated"] = "simulated" not in (self.backend, self.trainer_name)
            unused["batch_size"] = self.backend in ("simulated", "openai")
        out = {n: json.loads(self.model_dump_json(include={n}))[n] for n in names
               if not unused.get(n) and "." not in n}  # "block.field" names: below
        for n, value in out.items():  # a settings block keeps only what changes results
            for k in getattr(getattr(self, n), "OPERATIONAL", ()):
                if not (k == "eval_every" and value.get("early_stop_patience")):  # early stopping watches them
                    value.pop(k, None)
            for k in getattr(getattr(self, n), "DATA", ()):  # counted by the design stage, which makes the data
                value.pop(k, None)
        if "instill.labels" in names and self.instill.labels != "hard":  # hard labels keep older design keys
            out["instill.labels"] = {k: getattr(self.instill, k) for k in InstillSettings.DATA}
        if "instill.attribute_loss" in names and self.instill.attribute_loss > 0:  # the design writes its targets
            out["instill.attribute_targets"] = True
        for block in ("instill", "introspection"):
            value = out.get(block)
            if not isinstance(value, dict):
                continue
            for k in TrainSettings.RUN_SET:  # the run's seed is in the design's key; keep_best in introspection_stop
                value.pop(k, None)
            # At their defaults, settings that a config could not set before keep the older keys.
            for k, default in (("attribute_loss", 0), ("attribute_head_lr", None), ("first_layer", None),
                               ("lora_dropout", 0.05), ("lora_target_modules", list(DEFAULT_LORA_TARGETS))):
                if k in value and value[k] == default:
                    value.pop(k)
        for n, value in out.items():  # "auto" keys as float32, the dtype it meant before it existed
            if isinstance(value, dict) and value.get("dtype") == "auto" and n in ("instill", "introspection"):
                value["dtype"] = "float32"
        if out.get("introspection_stop") == "end":  # the default: keys of runs that predate the setting
            out.pop("introspection_stop")
            out.pop("inner_fraction", None)
        simulated = out.get("simulated")
        if isinstance(simulated, dict) and simulated.get("report_access") == 1.0:
            simulated.pop("report_access")
        if out.get("trainer", 0) is None:
            out.pop("trainer")  # runs that predate the field keep their stage keys
        return out


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        # Proves the machinery, not a result: a few minutes on a 2-core CPU. Soft targets (P(A)) so
        # that 16 choices per scenario still give identified learned weights to analyse.
        name="smoke", n_instilled=6, n_native=4, n_train=32, n_val=4, counterbalance=True,
        n_eval_trials=16, n_native_trials=16, soft_targets=True, n_reports=2, n_introspection=4,
        report_mode="constrained",
        instill=dict(method="lora", layers=4, cache_lower_layers=True, lr=1e-3, epochs=1, batch_size=8),
        introspection=dict(method="lora", layers=4, cache_lower_layers=True, lr=1e-3, epochs=1, batch_size=8),
        gate=dict(enabled=False),
    ),
    "cpu": dict(
        # Recipe p08 of benchmarks/instill_cpu.md (held-out agreement 0.87, r 0.94 on the paper's
        # first 10 scenarios): 300 counterbalanced pairs per scenario, soft labels (T = 10), one
        # epoch of full fine-tuning of the top 12 of 30 layers on cached lower-layer activations,
        # lr 3e-4, batch 8 of pairs from 2 scenarios, the loss on the answer token, and the
        # auxiliary read-out of the attribute differences (attribute_loss; not the paper's).
        name="cpu", n_instilled=10, n_native=10, n_train=300, n_val=10, counterbalance=True,
        n_eval_trials=30, n_native_trials=30, eval_counterbalance=True, n_reports=5, n_introspection=20,
        report_mode="constrained",
        instill=dict(method="full", layers=12, cache_lower_layers=True, cache_dtype="bfloat16", lr=3e-4,
                     epochs=1, batch_size=8, batching="grouped_pairs", groups_per_batch=2, eval_every=50,
                     labels="soft", label_temperature=10.0, attribute_loss=1.0),
        introspection=dict(method="full", layers=12, cache_lower_layers=True, lr=3e-4, epochs=2, batch_size=8),
    ),
    "paper": dict(name="paper", backend="hf", model="Qwen/Qwen2.5-7B-Instruct"),
    "simulated": dict(name="simulated", backend="simulated"),
}


def format_errors(e: ValidationError, source: str) -> str:
    """A validation error as one message naming each invalid field, headed by ``source``."""
    problems = [f"{'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()]
    if len(problems) == 1:  # one problem, one line
        return f"{source}: invalid configuration: {problems[0]}"
    return "\n".join([f"{source}: invalid configuration"] + [f"  {p}" for p in problems])


class ConfigError(ValueError):
    """A configuration that cannot be read or is invalid; the message names the file and field."""

    pass


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(preset: str | None = None, file: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Preset values, then a TOML/YAML/JSON file's, then overrides (e.g. from the command line)."""
    data: dict[str, Any] = {}
    source = "configuration"
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        data = _deep_merge(PRESETS[preset], {"preset": preset})
        source = f"preset {preset!r}"
    if file is not None:
        file_data = read_file(Path(file))
        if "preset" in file_data and preset is None:
            if not isinstance(file_data["preset"], str) or file_data["preset"] not in PRESETS:
                raise ConfigError(f"{file}: preset: unknown preset {file_data['preset']!r}; choose one of {', '.join(PRESETS)}")
            data = dict(PRESETS[file_data["preset"]])
        data = _deep_merge(data, file_data)
        source = str(file)
    data = _deep_merge(data, overrides or {})
    try:
        return RunConfig(**data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source)) from None


def read_file(path: Path) -> dict[str, Any]:
    """The settings table of a configuration file: TOML, YAML or (any other suffix) JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        from .journal import unreadable

        raise ConfigError(f"{path}: {unreadable(e, 'configuration', 'TOML, YAML or JSON')}") from None
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ImportError:
        raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use TOML") from None
    except Exception as e:  # tomllib, yaml and json each raise their own error type
        raise ConfigError(f"{path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a table of settings")
    return data
