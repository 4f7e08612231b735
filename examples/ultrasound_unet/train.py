"""Train the example U-Net on simulated ultrasound and measure it on held-out frames.

All data is simulated in code (``edgescope.runtime.sources.synthetic``); no
patient images are used. Training draws a pool of frames from one seed and
samples random crops from it (a fully convolutional net learns the same
filters from crops, at a fraction of the CPU cost of whole frames); the
held-out set comes from a different seed and is scored at the frame's native
resolution, the way the runtime reports masks.

    python examples/ultrasound_unet/train.py --steps 1500

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
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from model import INPUT_SIZE, SCALE, build, postprocess, preprocess
from torch import nn

from edgescope.runtime.sources.synthetic import simulate_ultrasound

log = logging.getLogger("train")

HERE = Path(__file__).resolve().parent
FRAME_HEIGHT = 480
FRAME_WIDTH = 640

Image = npt.NDArray[np.uint8]
Sample = tuple[Image, Image]


def simulated_set(seed: int, count: int) -> list[Sample]:
    """``count`` simulated (image, mask) pairs at the native frame size."""
    rng = np.random.default_rng(seed)
    return [simulate_ultrasound(rng, FRAME_HEIGHT, FRAME_WIDTH) for _ in range(count)]


def _training_pool(seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-sized inputs (uint8) and soft targets (lesion fraction per pixel)."""
    images = np.empty((count, INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)
    targets = np.empty((count, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    rng = np.random.default_rng(seed)
    size = (INPUT_SIZE, INPUT_SIZE)
    for i in range(count):
        image, mask = simulate_ultrasound(rng, FRAME_HEIGHT, FRAME_WIDTH)
        images[i] = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        # Area-resized mask = fraction of each input pixel that is lesion.
        targets[i] = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    return torch.from_numpy(images), torch.from_numpy(targets)


def _batch(
    images: torch.Tensor, targets: torch.Tensor, size: int, crop: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops with random left-right flips (the fan is symmetric)."""
    picks = torch.randint(0, images.shape[0], (size,), generator=gen)
    corners = torch.randint(0, INPUT_SIZE - crop + 1, (size, 2), generator=gen)
    flips = torch.rand(size, generator=gen) < 0.5
    xs, ys = [], []
    for pick, (r, c), flip in zip(picks.tolist(), corners.tolist(), flips.tolist(), strict=True):
        x = images[pick, r : r + crop, c : c + crop]
        y = targets[pick, r : r + crop, c : c + crop]
        if flip:
            x, y = x.flip(-1), y.flip(-1)
        xs.append(x)
        ys.append(y)
    x = torch.stack(xs)[:, None].float() * SCALE
    return x, torch.stack(ys)[:, None]


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus soft Dice over the batch (batch-wide, so empty crops are fine)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    dice = (2 * inter + 1.0) / (prob.sum() + target.sum() + 1.0)
    return bce + (1 - dice)


@torch.no_grad()
def evaluate(model: nn.Module, samples: Iterable[Sample], batch_size: int = 16) -> dict[str, float]:
    """Score ``model`` on (image, mask) pairs at the frames' native resolution.

    Per image, Dice and IoU; an image with no lesion scores 1 when nothing is
    predicted and 0 otherwise. Precision and recall are over all pixels
    pooled. Also reported: Dice over images that have a lesion, and the share
    of lesion-free images with any false positive.
    """
    model.eval()
    dice: list[float] = []
    iou: list[float] = []
    dice_lesion: list[float] = []
    false_alarms = empty = 0
    tp = fp = fn = 0
    batch: list[Sample] = []

    def flush() -> None:
        nonlocal false_alarms, empty, tp, fp, fn
        x = torch.from_numpy(np.stack([preprocess(image) for image, _ in batch]))
        logits = model(x)[:, 0].numpy()
        for (image, truth), out in zip(batch, logits, strict=True):
            pred = postprocess(out, *image.shape).astype(bool)
            gt = truth.astype(bool)
            inter = int(np.count_nonzero(pred & gt))
            n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
            tp, fp, fn = tp + inter, fp + n_pred - inter, fn + n_gt - inter
            if n_gt == 0:
                empty += 1
                false_alarms += n_pred > 0
                score = float(n_pred == 0)
                dice.append(score)
                iou.append(score)
                continue
            dice.append(2 * inter / (n_pred + n_gt))
            iou.append(inter / (n_pred + n_gt - inter))
            dice_lesion.append(dice[-1])
        batch.clear()

    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return {
        "images": float(len(dice)),
        "dice": float(np.mean(dice)),
        "iou": float(np.mean(iou)),
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "dice_images_with_lesions": float(np.mean(dice_lesion)) if dice_lesion else 1.0,
        "lesion_free_images": float(empty),
        "false_alarm_rate_lesion_free": false_alarms / empty if empty else 0.0,
    }


def train(
    steps: int, batch_size: int, crop: int, pool_size: int, lr: float, seed: int
) -> tuple[nn.Module, dict[str, float]]:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    images, targets = _training_pool(seed, pool_size)
    pool_s = time.perf_counter() - t0
    log.info("simulated %d training frames in %.1f s", pool_size, pool_s)

    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # Cosine decay: large steps early, fine adjustments at the end.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    running = 0.0
    t1 = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = _batch(images, targets, batch_size, crop, gen)
        loss = _loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 100 == 0 or step == steps:
            log.info("step %5d  loss %.4f  %.1f s", step, running, time.perf_counter() - t1)
    return model, {
        "pool_time_s": round(pool_s, 1),
        "fit_time_s": round(time.perf_counter() - t1, 1),
        "final_loss": round(running, 4),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop", type=int, default=128, help="training crop side (pixels)")
    parser.add_argument("--pool", type=int, default=2000, help="simulated training frames")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0, help="training data and init seed")
    parser.add_argument("--eval-seed", type=int, default=1000, help="held-out data seed")
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE, help="directory for the outputs")
    args = parser.parse_args(argv)
    if args.seed == args.eval_seed:
        parser.error("--seed and --eval-seed must differ: the held-out set must be unseen")
    if not 32 <= args.crop <= INPUT_SIZE or args.crop % 8:
        parser.error(f"--crop must be a multiple of 8 in [32, {INPUT_SIZE}]")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, fit = train(args.steps, args.batch_size, args.crop, args.pool, args.lr, args.seed)
    train_s = time.perf_counter() - t0

    held_out = evaluate(model, simulated_set(args.eval_seed, args.eval_images))
    log.info("held-out: %s", json.dumps(held_out))

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "weights.pt"
    torch.save(model.state_dict(), weights)
    blob = weights.read_bytes()
    metrics = {
        "held_out": {k: round(v, 4) for k, v in held_out.items()},
        "held_out_seed": args.eval_seed,
        "evaluated_at": f"{FRAME_HEIGHT}x{FRAME_WIDTH} (native frame size)",
        "train": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "crop": args.crop,
            "pool_frames": args.pool,
            "lr": args.lr,
            "seed": args.seed,
            "threads": args.threads,
            "train_time_s": round(train_s, 1),
            **fit,
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
