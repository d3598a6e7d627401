"""Learn2PD (Bao et al., 2025, "Learning to parallel decode"): a tiny learned unmasking filter.

The filter predicts, for every masked slot at every step, whether its current
argmax already equals the token one-token-per-step decoding will finally put
there; slots the filter trusts are committed together. Here it is a logistic
regression on six per-slot features (:func:`slot_features`), fit on the
trained model's own one-token-per-step trajectories over training-seed
instances — seconds to a couple of minutes on one CPU core. End-of-text
prediction (:func:`~paradecode.diffusion.rules.eot_fill`) stops decoding the
``<eos>`` padding once an ``<eos>`` is committed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..methods.base import check, option
from . import rules
from .model import WEIGHTS_DIR, MaskedDiffusionLM
from .samplers import BlockOptions, LowConfidence, Sampler, Selection, StepState, generate, register
from .tasks import TASKS, TRAIN_SEED_BASE

FEATURES = ("confidence", "gap", "slot", "progress", "near_committed", "is_eos")
FILTER_PATH = WEIGHTS_DIR / "learn2pd_filter.json"


def slot_features(st: StepState) -> torch.Tensor:
    """(B, G, 6) features of every slot at this step; see :data:`FEATURES`."""
    B, G = st.conf.shape
    committed = ~st.answer_masked                                                # (B, G)
    near = torch.nn.functional.max_pool1d(committed.float()[:, None], 3, stride=1, padding=1)[:, 0]
    progress = committed.float().mean(dim=1, keepdim=True).expand(B, G)
    slot = (torch.arange(G, dtype=torch.float32) / G).expand(B, G)
    is_eos = (st.tokens == st.eos_id).float()
    return torch.stack([st.conf, st.gap.clamp(max=10) / 10, slot, progress, near, is_eos], dim=-1)


@dataclass
class LogisticFilter:
    weight: torch.Tensor     # (F,)
    bias: float

    def prob(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(feats @ self.weight + self.bias)                    # (B, G)

    def save(self, path: Path, meta: dict) -> None:
        Path(path).write_text(json.dumps({"features": FEATURES, "weight": self.weight.tolist(),
                                          "bias": self.bias, **meta}, indent=1))

    @classmethod
    def load(cls, path: Path) -> "LogisticFilter":
        """A filter saved by :meth:`save`; a UserError naming the file when it is not one."""
        path = Path(path)
        fix = "pass -o filter= a JSON file written by `paradecode diffusion train-filter --out`"
        if path.is_dir():
            raise UserError(f"Learn2PD filter {path} is a folder", fix, field="filter")
        if not path.is_file():
            raise UserError(f"Learn2PD filter {path} not found", fix, field="filter")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"Learn2PD filter {path} is not readable JSON ({e})", fix, field="filter") from None
        w = d.get("weight") if isinstance(d, dict) else None
        ok = isinstance(w, list) and len(w) == len(FEATURES) and \
            all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w + [d.get("bias")])
        if not ok:
            raise UserError(f"Learn2PD filter {path} does not hold a filter (a \"weight\" list of "
                            f"{len(FEATURES)} numbers and a \"bias\" number)", fix, field="filter")
        return cls(torch.tensor(w, dtype=torch.float32), float(d["bias"]))


class _Recorder(LowConfidence):
    """One-token-per-step decoding that records every step's features and argmax tokens."""

    name = "_recorder"

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def select(self, st):
        self.rows.append((slot_features(st)[st.masked], st.tokens[st.masked], st.masked.nonzero()[:, 1]))
        return super().select(st)


def collect(model: MaskedDiffusionLM, per_task: int = 30, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, F) and labels (N,) from one-token-per-step trajectories on training-seed instances."""
    from .train import encode_instance

    rng = random.Random(TRAIN_SEED_BASE + 424242 + seed)
    X, y = [], []
    for task in TASKS.values():
        for _ in range(per_task):
            prompt, answer = task.sample(rng)
            p, _ = encode_instance(prompt, answer, task.gen_length)
            rec = _Recorder()
            final = generate(model, p, task.gen_length, rec).answer[0]                  # (G,)
            for feats, toks, slots in rec.rows:
                X.append(feats)
                y.append((toks == final[slots]).float())
    return torch.cat(X), torch.cat(y)


def fit(X: torch.Tensor, y: torch.Tensor, l2: float = 1e-3) -> LogisticFilter:
    """Logistic regression by L-BFGS on (N, F) features."""
    w = torch.zeros(X.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticFilter(w.detach(), float(b.detach()))


def train_filter(model: MaskedDiffusionLM, out: Path = FILTER_PATH, per_task: int = 30) -> dict:
    torch.set_num_threads(1)
    X, y = collect(model, per_task)
    filt = fit(X, y)
    acc = float(((filt.prob(X) > 0.5).float() == y).float().mean())
    meta = {"examples": int(len(y)), "positive_rate": float(y.mean()), "train_accuracy": acc,
            "per_task": per_task}
    filt.save(out, meta)
    return meta


@dataclass(frozen=True)
class Learn2PDOptions(BlockOptions):
    threshold: float = option(0.9, "commit masked slots whose predicted probability of being final exceeds this")
    eot: bool = option(True, "end-of-text prediction: fill every slot after a committed <eos> with <eos>")
    filter: str = option("", "filter JSON (default: the shipped one trained on the shipped model)")

    def validate(self) -> None:
        super().validate()
        check(0.0 <= self.threshold <= 1.0, "threshold", f"must be in [0, 1], got {self.threshold}",
              "pass a probability such as 0.9")


@register
class Learn2PD(Sampler):
    """Learn2PD: a learned filter decides which slots are final; plus end-of-text prediction."""

    name = "learn2pd"
    Config = Learn2PDOptions
    summary = "Learn2PD: logistic-regression filter on confidences + end-of-text prediction"

    def __init__(self, config=None):
        super().__init__(config)
        self.filter = LogisticFilter.load(Path(self.config.filter) if self.config.filter else FILTER_PATH)

    def select(self, st):
        p = self.filter.prob(slot_features(st))                                  # (B, G)
        commit = rules.at_least_one(p > self.config.threshold, st.conf, st.masked)
        tokens = st.tokens
        if self.config.eot:
            current = torch.where(st.answer_masked, st.tokens, st.x[:, st.prompt_length:])
            fill = rules.eot_fill(current, ~st.answer_masked | commit, st.eos_id) & st.answer_masked
            commit = commit | fill
            tokens = torch.where(fill, torch.full_like(tokens, st.eos_id), tokens)
        return Selection(commit, tokens)
