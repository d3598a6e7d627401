"""Train the small task diffusion model on CPU (masked-diffusion objective).

Objective (LLaDA, Nie et al., 2025; MDLM, Sahoo et al., 2024): for each
example draw t ~ U(0, 1), replace every answer token by ``<mask>`` with
probability t, and minimise the cross-entropy on the masked answer positions
weighted by 1/t (an upper bound on the negative log-likelihood), normalised
by the answer length. The prompt is never masked and carries no loss.

Deterministic and resumable: the batch of step ``n`` depends only on
``(seed, n)``, and the checkpoint stores model, optimiser and step, so a run
resumed from a checkpoint continues exactly where it stopped.

Reproduce the shipped weights (two stages; see docs/diffusion.md)::

    paradecode diffusion train --out stage1.safetensors
    paradecode diffusion train --init stage1.safetensors --steps 1200 --lr 1e-3 --warmup 50 --seed 1 --mix reverse=4,text=1,replace=1.5,latin=2.5 \
        --out src/paradecode/diffusion/weights/tasks.safetensors
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from .model import DiffusionShape, DiffusionTransformer
from .tasks import TASKS, TRAIN_MIX
from .vocab import VOCAB


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 48
    lr: float = 2e-3
    warmup: int = 200
    seed: int = 0
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    checkpoint_every: int = 250
    init_from: str = ""          # start from these weights (a second training stage)
    mix: str = ""                # task-weight overrides, e.g. "reverse=4,text=1"

    def validate(self) -> None:
        """UserError naming the CLI option of the first bad field."""
        if self.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.steps}", "pass a positive number of steps", field="steps")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a finite number > 0, got {self.lr}", "pass e.g. --lr 2e-3", field="lr")
        if self.warmup < 0:
            raise UserError(f"--warmup must be >= 0, got {self.warmup}", "pass 0 or more warm-up steps",
                            field="warmup")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"--seed must be in 0..{MAX_SEED}, got {self.seed}", "pass e.g. --seed 1", field="seed")
        try:
            task_mix(self.mix)
        except ValueError as e:
            raise UserError(f"--mix: {e}", f"write task=weight pairs with weights >= 0, e.g. reverse=4,text=1; "
                                           f"tasks: {', '.join(TRAIN_MIX)}", field="mix") from None


MAX_SEED = 2**32 - 1          # the batch seed seed * 1_000_003 + step must fit torch's int64


def model_shape(cfg: TrainConfig) -> DiffusionShape:
    return DiffusionShape(vocab_size=len(VOCAB), hidden=cfg.hidden, intermediate=cfg.intermediate,
                          layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.heads, head_dim=cfg.hidden // cfg.heads,
                          max_context=64, mask_id=VOCAB.mask_id, eos_id=VOCAB.eos_id, pad_id=VOCAB.pad_id)


def encode_instance(prompt: list[str], answer: list[str], gen_length: int) -> tuple[list[int], list[int]]:
    """Prompt ids and answer ids padded with ``<eos>`` to ``gen_length``."""
    a = VOCAB.encode(" ".join(answer)) + [VOCAB.eos_id] * (gen_length - len(answer))
    return VOCAB.encode(" ".join(prompt)), a


def task_mix(overrides: str = "") -> dict[str, float]:
    """The training mixture with ``"task=weight,..."`` overrides applied."""
    mix = dict(TRAIN_MIX)
    for item in filter(None, (i.strip() for i in overrides.split(","))):
        name, sep, w = (x.strip() for x in item.partition("="))
        if name not in mix:
            raise ValueError(f"unknown task {name!r} in mix")
        try:
            weight = float(w) if sep else None
        except ValueError:
            weight = None
        if weight is None or not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"the weight of {name} must be a number >= 0, got {w!r}" if sep
                             else f"{item!r} has no weight")
        mix[name] = weight
    if not any(mix.values()):
        raise ValueError("every task has weight 0")
    return mix


def make_batch(seed: int, step: int, batch_size: int, mix: str = ""):
    """(ids, answer_mask, key_valid), each (B, T): the clean batch of training step ``step``."""
    rng = random.Random(seed * 1_000_003 + step)
    weights_by_task = task_mix(mix)
    names, weights = list(weights_by_task), list(weights_by_task.values())
    rows = []
    for _ in range(batch_size):
        task = TASKS[rng.choices(names, weights)[0]]
        p, a = encode_instance(*task.sample(rng), task.gen_length)
        rows.append((p, a))
    T = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((batch_size, T), VOCAB.pad_id)
    answer = torch.zeros(batch_size, T, dtype=torch.bool)
    valid = torch.zeros(batch_size, T, dtype=torch.bool)
    for b, (p, a) in enumerate(rows):
        ids[b, :len(p) + len(a)] = torch.tensor(p + a)
        answer[b, len(p):len(p) + len(a)] = True
        valid[b, :len(p) + len(a)] = True
    return ids, answer, valid


def diffusion_loss(model: DiffusionTransformer, ids, answer, valid, gen: torch.Generator) -> torch.Tensor:
    """Masked-diffusion loss: CE on masked answer slots weighted by 1/t, per answer token."""
    B = ids.shape[0]
    t = torch.rand(B, 1, generator=gen).clamp_min(1e-3)                 # (B, 1) mask ratio
    masked = (torch.rand(ids.shape, generator=gen) < t) & answer         # (B, T)
    noisy = torch.where(masked, torch.full_like(ids, model.shape.mask_id), ids)
    logits, _ = model(noisy, key_valid=valid)                            # (B, T, V)
    ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")  # (B, T)
    per_example = (ce * masked).sum(1) / t.squeeze(1) / answer.sum(1)
    return per_example.mean()


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train(cfg: TrainConfig, out: Path, checkpoint: Path | None = None, threads: int = 1,
          progress: bool = True, stop_after: int | None = None) -> DiffusionTransformer | None:
    """Train (or resume from ``checkpoint``, default ``OUT.ckpt.pt``) and write ``out``.
    ``stop_after`` ends the run after that step with a checkpoint (returns None), as an interruption would."""
    from ..models.loading import set_threads

    cfg.validate()
    set_threads(threads)
    torch.manual_seed(cfg.seed)
    model = DiffusionTransformer(model_shape(cfg))
    if cfg.init_from:
        init = DiffusionTransformer.load(Path(cfg.init_from))
        if init.shape != model.shape:
            raise UserError(f"--init {cfg.init_from} is a model of another shape than this run trains: "
                            f"{_shape_diff(init.shape, model.shape)}",
                            "pass --init weights written by `paradecode diffusion train`", field="init")
        model.load_state_dict(init.state_dict())
        model.requires_grad_(True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    start = 0
    ema = None
    checkpoint = checkpoint_path(out, checkpoint)
    state = read_checkpoint(checkpoint, cfg)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, ema = state["step"], state.get("loss_ema")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn())
    t0 = time.perf_counter()
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=cfg.steps, completed=start, loss=float("nan") if ema is None else ema)
        for step in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            loss = diffusion_loss(model, *make_batch(cfg.seed, step, cfg.batch_size, cfg.mix), gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            bar.update(task, advance=1, loss=ema)
            stopping = stop_after is not None and step + 1 >= stop_after
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or stopping:
                _save_checkpoint(checkpoint, {"config": asdict(cfg), "model": model.state_dict(),
                                              "opt": opt.state_dict(), "step": step + 1, "loss_ema": ema})
            if stopping:
                return None
    # a re-run of a finished run trains no step: its weights are written again from the checkpoint
    model.save(Path(out), meta={"train_config": json_dumps(asdict(cfg)),
                                "final_loss_ema": "unknown" if ema is None else f"{ema:.4f}",
                                "train_seconds_this_run": f"{time.perf_counter() - t0:.0f}"})
    return model.eval().requires_grad_(False)


def checkpoint_path(out: Path, checkpoint: Path | None = None) -> Path:
    """Where a run writing ``out`` keeps its checkpoint (default ``OUT.ckpt.pt``)."""
    return Path(checkpoint) if checkpoint else Path(out).with_suffix(".ckpt.pt")


def read_checkpoint(checkpoint: Path, cfg: TrainConfig) -> dict | None:
    """The saved state of this run (None when there is none); UserError when the file is unreadable
    or was written by a run with other settings."""
    if not checkpoint.exists():
        return None
    fix = f"pass another --out, or delete {checkpoint} to start afresh"
    try:
        state = torch.load(checkpoint, weights_only=False)
    except Exception as e:                           # noqa: BLE001  (pickle, zip and OS errors)
        raise UserError(f"cannot read the training checkpoint {checkpoint} ({type(e).__name__})", fix,
                        field="out") from None
    if not isinstance(state, dict) or not {"config", "model", "opt", "step"} <= set(state) \
            or not isinstance(state["config"], dict):
        raise UserError(f"{checkpoint} is not a `paradecode diffusion train` checkpoint", fix, field="out")
    if state["config"] != asdict(cfg):
        flags = {"steps": "--steps", "seed": "--seed", "init_from": "--init", "lr": "--lr", "warmup": "--warmup",
                 "mix": "--mix"}
        now, then = asdict(cfg), state["config"]
        diff = [f"{flags.get(k, k)} {then.get(k, '(unset)')!r} (now {now.get(k, '(unset)')!r})"
                for k in {**then, **now} if then.get(k, "(unset)") != now.get(k, "(unset)")]
        raise UserError(f"checkpoint {checkpoint} belongs to a run with other settings: {'; '.join(diff)}",
                        f"rerun with those settings to resume it, or {fix}", field="out")
    return state


def _save_checkpoint(checkpoint: Path, state: dict) -> None:
    tmp = checkpoint.with_suffix(".tmp")             # written whole, then renamed: never half a checkpoint
    torch.save(state, tmp)
    tmp.replace(checkpoint)


def _shape_diff(got: DiffusionShape, want: DiffusionShape) -> str:
    a, b = asdict(got), asdict(want)
    return ", ".join(f"{k} {a[k]} (this run: {b[k]})" for k in a if a[k] != b[k])


def json_dumps(d) -> str:
    import json
    return json.dumps(d, sort_keys=True)
