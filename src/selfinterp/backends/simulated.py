"""A simulated model with known answers: ground truth for the pipeline and its statistics.

It reads the same prompts a language model reads and answers through the same interface:

- choices: a decision-maker with weights w per scenario answers A with probability
  sigmoid((U(A) - U(B)) / choice_noise + position_bias), U as in the protocol;
- after introspection training (:mod:`selfinterp.training.simulated`): its reports get less
  noisy (``introspection_gain``), on every scenario, trained or not (the generalisation the
  paper reports);
- self-reports: its true weights plus Gaussian noise (``report_noise``) and ``report_bias``,
  clipped to [-100, 100], as the JSON the paper asks for; with ``report_access`` < 1 they
  centre on a mix of its true weights and weights unrelated to its choices (0: a model that
  cannot see its own preferences, the null the permutation test must not reject).

The decision-maker itself (native weights, fine-tuned state) is
:class:`selfinterp.simulated_model.SimulatedModel`. Draws are seeded by the prompt, so answers are
reproducible and a resumed run gets the answers it would have got.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np

from .. import design, prompts
from ..simulated_model import SimulatedModel
from .base import WEIGHT_MAX, WEIGHT_MIN, ChoiceProbs, Messages, SelfReport, call_seeds


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "little")


class SimulatedBackend(SimulatedModel):
    """The simulated model answering the backend protocol from its prompts."""

    def choice_probs(self, chats: Sequence[Messages]) -> ChoiceProbs:
        """P(A) per decision prompt from the utility difference under its true weights (mass 1)."""
        self._delay(len(chats))
        p = []
        for chat in chats:
            _, s, a, b = self._read(chat)
            w = self.true_weights(s)
            du = float(design.utility(s, w, np.array(a)) - design.utility(s, w, np.array(b)))
            p.append(1.0 / (1.0 + np.exp(-(du / self.settings["choice_noise"] + self.settings["position_bias"]))))
        return ChoiceProbs(p_a=np.array(p), mass=np.ones(len(p)))

    def generate(self, chats: Sequence[Messages], max_new_tokens: int = 256, temperature: float = 0.0,
                 seed: int | Sequence[int] = 0) -> list[str]:
        """Replies drawn from a generator seeded by (the model's seed, the chat's seed, the prompt):
        a reply never depends on the other chats of the call. ``seed`` is one int for every chat
        or one per chat."""
        self._delay(len(chats))
        seeds = [int(seed)] * len(chats) if isinstance(seed, (int, np.integer)) else call_seeds(seed, len(chats))
        out = []
        for chat, chat_seed in zip(chats, seeds):
            user, s, a, b = self._read(chat)
            rng = np.random.default_rng(_seed_of(self.seed, chat_seed, user))
            if user.startswith("[DECISION TASK]"):
                p = self.choice_probs([chat]).p_a[0]
                out.append("A" if rng.uniform() < p else "B")
                continue
            noise = self.settings["report_noise"] * (self.settings["introspection_gain"] if self.introspection_trained else 1.0)
            reported = self.reported_centre(s) + self.settings["report_bias"] + rng.normal(scale=noise, size=s.k)
            out.append(prompts.report_json(s, np.clip(reported, -100, 100)))
        return out

    def expected_reports(self, chats: Sequence[Messages],
                         attribute_names_per_chat: Sequence[Sequence[str]]) -> list[SelfReport]:
        """What its sampled reports average to, exactly: per weight, the mean and SD of
        clip(N(centre + bias, noise), -100, 100), in closed form."""
        self._delay(len(chats))
        out = []
        for chat, names in zip(chats, attribute_names_per_chat):
            _, s, _, _ = self._read(chat)
            noise = self.settings["report_noise"] * (self.settings["introspection_gain"] if self.introspection_trained else 1.0)
            mu = self.reported_centre(s) + self.settings["report_bias"]
            means, sds = _clipped_normal_moments(mu, noise, WEIGHT_MIN, WEIGHT_MAX)
            weights = {n: float(m) for n, m in zip(names, means)}
            out.append(SelfReport(text=json.dumps({n: round(v, 4) for n, v in weights.items()}, ensure_ascii=False),
                                  weights=weights, mode="expected", sd={n: float(v) for n, v in zip(names, sds)}))
        return out

    def _delay(self, n: int) -> None:
        """Optional time per call, to test interruption and resumption mid-stage."""
        if self.settings["call_delay"] > 0:
            import time

            time.sleep(self.settings["call_delay"] * n)


def _clipped_normal_moments(mu: np.ndarray, sigma: float, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and SD of clip(X, lo, hi) for X ~ N(mu, sigma^2), elementwise."""
    mu = np.asarray(mu, dtype=float)
    if sigma == 0:
        return np.clip(mu, lo, hi), np.zeros_like(mu)
    from scipy.stats import norm

    a, b = (lo - mu) / sigma, (hi - mu) / sigma
    Fa, Fb, fa, fb = norm.cdf(a), norm.cdf(b), norm.pdf(a), norm.pdf(b)
    inside = Fb - Fa
    m1 = lo * Fa + hi * (1 - Fb) + mu * inside + sigma * (fa - fb)
    m2 = (lo**2 * Fa + hi**2 * (1 - Fb) + mu**2 * inside + 2 * mu * sigma * (fa - fb)
          + sigma**2 * (inside + a * fa - b * fb))
    return m1, np.sqrt(np.maximum(m2 - m1**2, 0.0))


# --------------------------------------------------------------------------------------------
# Calibration: which report noise gives a chosen accuracy


def expected_report_r(report_noise: float, n_reports: int, report_bias: float = 0.0, n: int = 20_000,
                      seed: int = 0, k: int = 5) -> float:
    """Population r between the mean of ``n_reports`` simulated reports and the true weights
    (weights drawn as the protocol draws them; reports clipped to [-100, 100] as the backend does)."""
    rng = np.random.default_rng(seed)
    w = design.rescale(rng.uniform(-100, 100, (n, k)))
    reps = np.clip(w + report_bias + rng.normal(scale=report_noise, size=(n_reports, n, k)), -100, 100)
    return float(np.corrcoef(reps.mean(axis=0).ravel(), w.ravel())[0, 1])


def report_noise_for_r(target_r: float, n_reports: int, report_bias: float = 0.0) -> float:
    """The per-report noise sd at which the mean of ``n_reports`` reports has population r = target."""
    if not 0 < target_r < 1:
        raise ValueError("target_r must be in (0, 1)")
    lo, hi = 0.0, 5000.0
    for _ in range(40):  # r falls as noise grows: bisection
        mid = (lo + hi) / 2
        if expected_report_r(mid, n_reports, report_bias, n=5000) > target_r:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
