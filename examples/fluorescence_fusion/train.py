"""Train the white-light + NIR fusion net on simulated pairs and measure it on held-out scenes.

All data is simulated in code: ``SyntheticEndoscopySource`` and
``SyntheticFluorescenceSource`` with the same seed give a registered pair at
each presentation time (see ``model.py`` for the target). Each scene (seed) is
sampled at its own random frame interval, so camera and instrument poses vary
across scenes, not only the tissue. Training samples aligned crops (a crop of
the white frame and the matching half-size crop of the NIR frame) from a pool
of pairs; the held-out scenes come from other seeds and are scored on whole
frames. To show that the net uses both cameras, the held-out set is scored
again with the NIR input zeroed, and with the white input zeroed.

    python examples/fluorescence_fusion/train.py

writes ``weights.pt`` (a state_dict) and ``metrics.json`` next to this file,
or under ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from model import NIR_SIZE, SCALE, THRESHOLD, WHITE_SIZE, build
from torch import nn

from edgescope.runtime.sources.endoscopy import SyntheticEndoscopySource
from edgescope.runtime.sources.fluorescence import SyntheticFluorescenceSource

log = logging.getLogger("train")

HERE = Path(__file__).resolve().parent
Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""White (N, 3, 256, 256) uint8, NIR (N, 1, 128, 128) uint8, target (N, 256, 256) uint8 0/1."""


def simulated_pairs(first_seed: int, scenes: int, frames: int) -> Pairs:
    """``frames`` registered pairs from each of ``scenes`` seeds, at the model's input sizes.

    The frames are made at those sizes, which is what the runtime's stretch
    to 256x256 and 128x128 gives for square frames.
    """
    whites, nirs, targets = [], [], []
    for seed in range(first_seed, first_seed + scenes):
        interval = float(np.random.default_rng([seed, 100]).uniform(0.6, 3.0))
        white = SyntheticEndoscopySource(seed, frames, 1 / interval, WHITE_SIZE, WHITE_SIZE)
        nir = SyntheticFluorescenceSource(seed, frames, 1 / interval, NIR_SIZE, NIR_SIZE)
        pairs = zip(white.frames_with_truth(), nir.frames_with_masks((WHITE_SIZE, WHITE_SIZE)), strict=True)
        for (white_frame, truth), (nir_frame, perfused) in pairs:
            whites.append(white_frame.pixels.transpose(2, 0, 1))
            nirs.append(nir_frame.pixels[None])
            # Perfused tissue seen in white light: not under glare (the instrument is out already).
            targets.append(perfused & (truth.glare == 0))
    return torch.from_numpy(np.stack(whites)), torch.from_numpy(np.stack(nirs)), torch.from_numpy(np.stack(targets))


def _inputs(white: torch.Tensor, nir: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 -> the model's float inputs: level / 255 (the runtime's scale 1/255, mean 0, std 1)."""
    return white.float() * SCALE, nir.float() * SCALE


def _batch(pool: Pairs, size: int, crop: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Aligned random crops: white and target at (r, c), NIR at (r/2, c/2); corners even so they line up."""
    white, nir, target = pool
    picks = torch.randint(0, white.shape[0], (size,), generator=gen).tolist()
    corners = (torch.randint(0, (WHITE_SIZE - crop) // 2 + 1, (size, 2), generator=gen) * 2).tolist()
    half = crop // 2
    w = torch.stack([white[i, :, r : r + crop, c : c + crop] for i, (r, c) in zip(picks, corners, strict=True)])
    n = torch.stack(
        [nir[i, :, r // 2 : r // 2 + half, c // 2 : c // 2 + half] for i, (r, c) in zip(picks, corners, strict=True)]
    )
    y = torch.stack([target[i, r : r + crop, c : c + crop] for i, (r, c) in zip(picks, corners, strict=True)])
    return *_inputs(w, n), y[:, None].float()


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus soft Dice over the batch (batch-wide, so crops without perfusion are fine)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    dice = (2 * (prob * target).sum() + 1.0) / (prob.sum() + target.sum() + 1.0)
    return bce + (1 - dice)


@torch.no_grad()
def evaluate(model: nn.Module, pool: Pairs, *, drop: str | None = None, batch_size: int = 16) -> dict[str, float]:
    """Score on whole frames; ``drop`` = "nir" or "white" zeroes that input.

    Per frame Dice (a frame without perfused tissue scores 1 when nothing is
    predicted, else 0); precision and recall over all pixels pooled.
    """
    model.eval()
    white, nir, target = pool
    cut = float(np.log(THRESHOLD / (1 - THRESHOLD)))
    dice: list[float] = []
    tp = fp = fn = 0
    for start in range(0, white.shape[0], batch_size):
        w, n = _inputs(white[start : start + batch_size], nir[start : start + batch_size])
        if drop == "nir":
            n = torch.zeros_like(n)
        elif drop == "white":
            w = torch.zeros_like(w)
        pred = (model(w, n)[:, 0] > cut).numpy()
        for p, g in zip(pred, target[start : start + batch_size].numpy().astype(bool), strict=True):
            inter, n_pred, n_gt = int((p & g).sum()), int(p.sum()), int(g.sum())
            tp, fp, fn = tp + inter, fp + n_pred - inter, fn + n_gt - inter
            dice.append(float(n_pred == 0) if n_gt == 0 else 2 * inter / (n_pred + n_gt))
    return {
        "dice": float(np.mean(dice)),
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
    }


def train(pool: Pairs, steps: int, batch_size: int, crop: int, lr: float, seed: int) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # Cosine decay: large steps early, fine adjustments at the end.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    running = 0.0
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        w, n, y = _batch(pool, batch_size, crop, gen)
        loss = _loss(model(w, n), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 50 == 0 or step == steps:
            log.info("step %5d  loss %.4f  %.1f s", step, running, time.perf_counter() - t0)
    return model, running


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--crop", type=int, default=128, help="training crop side in the white frame (pixels)")
    parser.add_argument("--scenes", type=int, default=300, help="simulated training scenes (seeds)")
    parser.add_argument("--frames", type=int, default=6, help="pairs per scene")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0, help="first training seed; also the init seed")
    parser.add_argument("--eval-seed", type=int, default=10_000, help="first held-out seed")
    parser.add_argument("--eval-scenes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE, help="directory for the outputs")
    args = parser.parse_args(argv)
    if args.eval_seed < args.seed + args.scenes and args.seed < args.eval_seed + args.eval_scenes:
        parser.error("the held-out seeds must not overlap the training seeds")
    if not 32 <= args.crop <= WHITE_SIZE or args.crop % 8:
        parser.error(f"--crop must be a multiple of 8 in [32, {WHITE_SIZE}]")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pool = simulated_pairs(args.seed, args.scenes, args.frames)
    pool_s = time.perf_counter() - t0
    log.info("simulated %d training pairs in %.1f s", pool[0].shape[0], pool_s)
    model, final_loss = train(pool, args.steps, args.batch_size, args.crop, args.lr, args.seed)
    train_s = time.perf_counter() - t0

    held_out = simulated_pairs(args.eval_seed, args.eval_scenes, 2)
    scores = {
        "both": evaluate(model, held_out),
        "nir_zeroed": evaluate(model, held_out, drop="nir"),
        "white_zeroed": evaluate(model, held_out, drop="white"),
    }
    log.info("held-out: %s", json.dumps(scores))

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "weights.pt"
    torch.save(model.state_dict(), weights)
    blob = weights.read_bytes()
    metrics = {
        "held_out": {name: {k: round(v, 4) for k, v in score.items()} for name, score in scores.items()},
        "held_out_pairs": int(held_out[0].shape[0]),
        "held_out_seeds": [args.eval_seed, args.eval_seed + args.eval_scenes - 1],
        "evaluated_at": f"white {WHITE_SIZE}x{WHITE_SIZE}, NIR {NIR_SIZE}x{NIR_SIZE} (whole frames)",
        "target": "ICG-perfused tissue in view, not behind the instrument, not under specular glare",
        "train": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "crop": args.crop,
            "scenes": args.scenes,
            "pairs": int(pool[0].shape[0]),
            "lr": args.lr,
            "seed": args.seed,
            "threads": args.threads,
            "train_time_s": round(train_s, 1),
            "pool_time_s": round(pool_s, 1),
            "final_loss": round(final_loss, 4),
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_bytes": len(blob),
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("wrote %s and metrics.json (%d bytes)", weights, len(blob))


if __name__ == "__main__":
    main()
