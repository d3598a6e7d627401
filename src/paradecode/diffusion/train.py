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
    for item in filter(None, overrides.split(",")):
        name, _, w = item.partition("=")
        if name not in mix:
            raise ValueError(f"unknown task {name!r} in mix")
        mix[name] = float(w)
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
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = DiffusionTransformer(model_shape(cfg))
    if cfg.init_from:
        model.load_state_dict(DiffusionTransformer.load(Path(cfg.init_from)).state_dict())
        model.requires_grad_(True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    start = 0
    checkpoint = Path(checkpoint) if checkpoint else Path(out).with_suffix(".ckpt.pt")
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["config"] != asdict(cfg):
            raise SystemExit(f"checkpoint {checkpoint} was written with a different config: {state['config']}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn())
    ema = None
    t0 = time.perf_counter()
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=cfg.steps, completed=start, loss=float("nan"))
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
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                tmp = checkpoint.with_suffix(".tmp")
                torch.save({"config": asdict(cfg), "model": model.state_dict(), "opt": opt.state_dict(),
                            "step": step + 1}, tmp)
                tmp.replace(checkpoint)
            if stop_after is not None and step + 1 >= stop_after:
                if (step + 1) % cfg.checkpoint_every:
                    torch.save({"config": asdict(cfg), "model": model.state_dict(), "opt": opt.state_dict(),
                                "step": step + 1}, checkpoint)
                return None
    model.save(Path(out), meta={"train_config": json_dumps(asdict(cfg)), "final_loss_ema": f"{ema:.4f}",
                                "train_seconds_this_run": f"{time.perf_counter() - t0:.0f}"})
    return model.eval().requires_grad_(False)


def json_dumps(d) -> str:
    import json
    return json.dumps(d, sort_keys=True)
