"""Train ``shapes-llava`` with dense auxiliary supervision of the projector (the shipped weights' recipe).

    python -m mmcompress.evals.train_shapes_aux --budget-min 22 --aux-weight 1.0

Same model, data, sequence packing (block-masked QA segments), feature standardisation and evaluation as
:mod:`mmcompress.evals.train_shapes`, plus three linear heads on the projector output that predict, for
each of the 24×24 patches, the colour and the shape of the object covering it (≥ 25 % of the patch, else
background) and whether an object's centre falls in it. The labels come from the generator's scene
description, so they are exact. Why: the plain recipe plateaued at its text prior (42.9 %, colour at
chance) because a from-scratch LM had to discover both *what* each patch shows and *where* to look from
the answer loss alone; telling the projector what each patch shows lets the LM spend its steps on the
lookup. The heads are training-only and are not shipped.

Needs the tower-feature cache written by ``train_shapes --feature-cache`` (1600 images, 24 QAs each).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from mmcompress.zoo import build as zoo_build
from mmcompress.zoo.paths import shipped_weights_dir
from mmcompress.zoo.specs import SPECS

from . import train_shapes as base
from .shapesvqa import COLOURS, SHAPES, ShapesVQA, _polygon

NAME = "shapes-llava"
GRID, PATCH = 24, 14  # 336 px / 14 px patches
COVER = 0.25  # an object label needs this fraction of the patch


def patch_labels(ds: ShapesVQA, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch colour (0 = background, 1..6), shape (0, 1..4), object-centre (0/1) labels, ``[n, 576]``."""
    ci = {c: i + 1 for i, c in enumerate(COLOURS)}
    si = {s: i + 1 for i, s in enumerate(SHAPES)}
    side = GRID * PATCH
    colour = torch.zeros(n, GRID * GRID, dtype=torch.long)
    shape, centre = torch.zeros_like(colour), torch.zeros_like(colour)
    for i in tqdm(range(n), desc="patch labels", mininterval=10):
        objs = ds.with_extra_questions(i, 0)[0].objects
        cm, sm = Image.new("L", (side, side), 0), Image.new("L", (side, side), 0)
        dc, dsh = ImageDraw.Draw(cm), ImageDraw.Draw(sm)
        for o in objs:
            if o.shape == "circle":
                dc.ellipse(o.box, fill=ci[o.colour])
                dsh.ellipse(o.box, fill=si[o.shape])
            else:
                dc.polygon(_polygon(o), fill=ci[o.colour])
                dsh.polygon(_polygon(o), fill=si[o.shape])
            r, c = min(int(o.cy) // PATCH, GRID - 1), min(int(o.cx) // PATCH, GRID - 1)
            centre[i, r * GRID + c] = 1
        for arr, out, k in ((np.array(cm), colour, 7), (np.array(sm), shape, 5)):
            blocks = arr.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, -1)
            counts = np.stack([(blocks == v).sum(1) for v in range(k)], 1)
            counts[:, 0] = np.where(counts[:, 1:].max(1) >= COVER * PATCH * PATCH, 0, counts[:, 0])
            out[i] = torch.from_numpy(counts.argmax(1))
    return colour, shape, centre


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-min", type=float, default=22.0, help="training wall-time budget (minutes)")
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=1500, help="length of the cosine schedule")
    p.add_argument("--feature-cache", type=Path, default=Path("/tmp/featcache"))
    p.add_argument("--out", type=Path, default=None, help="default: the package's zoo/weights/shapes-llava")
    p.add_argument("--eval-n", type=int, default=280)
    args = p.parse_args(argv)

    torch.set_num_threads(2)
    base._set_seed(0)
    spec = SPECS[NAME]
    model, processor, tok = base.build_untrained(NAME)
    model.model.vision_tower.requires_grad_(False)
    n_images, batch, qas_per_seq, warmup, lr_max = 1600, 4, 14, 50, 1e-3
    data = base.precompute(model, processor, NAME, n_images, 24, 0, args.feature_cache)
    feats, qas = data["feats"], data["qas"]
    labels = patch_labels(ShapesVQA("train", n=n_images, seed=0, image_size=spec.image_size), n_images)
    hidden = spec.hidden_size
    heads = torch.nn.ModuleList(
        [torch.nn.Linear(hidden, 7), torch.nn.Linear(hidden, 5), torch.nn.Linear(hidden, 2)]
    )
    mu, sd = base.feature_stats(feats)
    builder = base.SequenceBuilder(tok)
    trainable = [q for n, q in model.named_parameters() if not n.startswith("model.vision_tower.")]
    trainable += list(heads.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [q for q in trainable if q.dim() >= 2], "weight_decay": 0.01},
            {"params": [q for q in trainable if q.dim() < 2], "weight_decay": 0.0},
        ],
        lr=lr_max,
        betas=(0.9, 0.98),
    )
    rng = np.random.default_rng(1)
    model.train()
    model.model.vision_tower.eval()
    t0, ema, log = time.time(), {}, []
    for step in range(args.steps):
        idx = rng.choice(n_images, size=batch, replace=False)
        seqs = []
        for j in idx:
            pool = qas[int(j)]
            order = rng.permutation(len(pool))[:qas_per_seq]
            seqs.append(builder.build(GRID * GRID, [pool[k] for k in order]))
        lr = base._lr_at(step, args.steps, lr_max, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        bf = (feats[idx].float() - mu) / sd
        vis = model.model.multi_modal_projector(bf.reshape(batch, GRID * GRID, -1))
        aux = sum(
            F.cross_entropy(h(vis).reshape(-1, h.out_features), lab[idx].reshape(-1))
            for h, lab in zip(heads, labels)
        )
        loss, _, _, w_hit, w_n = base.train_step_loss(
            model,
            NAME,
            bf,
            data["image_sizes"][idx],
            seqs,
            tok.image_token_id,
            tok.pad_token_id,
            tok.eos_token_id,
        )
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        for k, v in (("loss", loss.item()), ("aux", aux.item()), ("word_acc", w_hit / max(w_n, 1))):
            ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
        if step % 25 == 0:
            log.append(
                {"step": step, **{k: round(v, 4) for k, v in ema.items()}, "t": round(time.time() - t0)}
            )
            print(json.dumps(log[-1]), flush=True)
        if time.time() - t0 > 60 * args.budget_min:
            print(f"time budget reached after {step + 1} steps", flush=True)
            break
    model.eval()
    base.fold_standardisation(model.model.multi_modal_projector.linear_1, mu, sd)
    out = args.out or shipped_weights_dir(NAME)
    zoo_build.save_shipped_weights(model, processor, out)
    result = base.evaluate(model.half().float(), processor, NAME, args.eval_n, 0)
    print(json.dumps({k: result[k] for k in ("overall", "per_family")}), flush=True)
    return {"result": result, "train_log": log}


if __name__ == "__main__":
    main()
