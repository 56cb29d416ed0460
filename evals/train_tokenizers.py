"""Train a small SEED or LaVIT discrete visual tokenizer on the embedded model's tower features.

    python -m mmcompress.evals.train_tokenizers --tokenizer seed  --feature-cache ~/.cache/mmcompress/features
    python -m mmcompress.evals.train_tokenizers --tokenizer lavit --feature-cache ~/.cache/mmcompress/features
    python -m mmcompress.evals.train_tokenizers --tokenizer seed --images 16 --eval-images 4 --steps 3 \\
        --phase1-steps 1 --out /tmp/tok --results /tmp/tok.json        # smoke test

Spec ``specs/tokenpacker-seed-lavit.md`` §2.4 (SEED) and §3.4 (LaVIT), scaled down to the embedded
``shapes-llava`` tower (frozen DINOv2 ViT-S/14 at 336 px, a 24x24 grid; features = the model's
``vision_feature_layer`` stack ``hidden_states[4] ⊕ hidden_states[-1]``, 768-d, CLS dropped), cached and
standardised per channel exactly like ``train_shapes``. ``--pool p`` averages ``p x p`` patches first (LaVIT's
merger attends over all N tokens; 576 -> 144 at p = 2 keeps CPU training short).

Two phases per tokenizer, as the spec describes, with one substitution each where ShapesVQA lacks the
official signal:

* **SEED** phase 1 trains the causal Q-Former so its 32 embeddings describe the image. Officially that is
  ITC against captions (§2.4 stage 1); ShapesVQA has no captions, so phase 1 here reconstructs the patch
  features from the 32 causal embeddings through a throw-away feature decoder (cosine loss). Phase 2 freezes
  the Q-Former and trains the task layers, the codebook and the heads with the official stage-2 loss
  ``5 L_vq + 2 L_rec + 0.5 L_img``; the image-embedding target (CLIP-ViT-H officially) is the mean of the
  standardised patch features here. The official quantizer (Euclidean, uniform init, gradient-trained)
  collapsed to 12 of 1024 codes on this data, so by default phase 2 starts the codebook from k-means on
  the task layer's outputs and restarts dead codes (``--codebook-init official --no-dead-code-restart``
  gives the official behaviour; the spec allows LaVIT's tricks if the codebook collapses).
* **LaVIT** phase 1 trains selector + merger + decoder without quantisation (cosine reconstruction of all
  N features + keep-ratio regulariser); phase 2 freezes the selector, initialises the codebook by k-means
  on phase-1 encoder outputs and trains merger + task layer + decoder with VQ (EMA codebook updates with
  dead-code restarts, §3.4 / issue #29).

Reports (``evals/results/train_tokenizer_<name>.json``): reconstruction cosine on held-out images, tokens per
image (fixed 32 for SEED; distribution for LaVIT) and codebook usage (perplexity, dead codes). Training an
LLM on the ids is a later step (``test_accuracy`` is null here). Weights go to ``--out`` (default
``runs/tokenizers/shapes-<name>``): ``tokenizer.safetensors`` + ``config.json`` (with the standardisation).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

if __package__ in (None, ""):  # run as a file: make the repo importable (evals/ installs as mmcompress.evals)
    _ROOT = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(_ROOT))
    from evals import train_shapes as ts  # type: ignore[no-redef]
else:
    from . import train_shapes as ts

from mmcompress.tokenizers import (
    LavitConfig,
    LavitTokenizer,
    SeedConfig,
    SeedTokenizer,
    codebook_usage,
    kmeans,
)
from mmcompress.tokenizers.lavit import LavitFeatureDecoder

NAME = "shapes-llava"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUNS_DIR = Path(__file__).resolve().parents[1] / "runs" / "tokenizers"
GRID = 24  # 336 px / 14 px patches


def pool_features(x: torch.Tensor, pool: int) -> torch.Tensor:
    """``[B, G*G, C] -> [B, (G/p)^2, C]``: ``p x p`` average pooling on the patch grid, raster order kept."""
    if pool == 1:
        return x
    b, n, c = x.shape
    g = int(math.isqrt(n))
    fmap = x.reshape(b, g, g, c).permute(0, 3, 1, 2)
    return F.avg_pool2d(fmap, pool).permute(0, 2, 3, 1).reshape(b, -1, c)


def build_tokenizer(args: argparse.Namespace, width: int) -> SeedTokenizer | LavitTokenizer:
    if args.tokenizer == "seed":
        cfg = SeedConfig(
            vision_hidden_size=width,
            image_size=336,
            num_query_tokens=32,
            qformer_hidden_size=args.hidden,
            qformer_layers=args.layers,
            qformer_heads=args.heads,
            qformer_intermediate_size=4 * args.hidden,
            codebook_size=args.codebook_size,
            codebook_dim=32,
            decoder_depth=2,
            decoder_heads=args.heads,
            image_embed_dim=width,
        )
        return SeedTokenizer(cfg)
    cfg = LavitConfig(
        vision_hidden_size=width,
        image_size=336,
        patch_size=14 * args.pool,
        num_prefix_tokens=0,
        merger_layers=args.layers,
        merger_heads=args.heads,
        merger_intermediate_size=2 * width,
        codebook_size=args.codebook_size,
        codebook_dim=32,
        ema=True,
        min_tokens=1,
        llm_hidden_size=0,
        decoder=True,
        decoder_layers=args.layers,
        decoder_heads=args.heads,
        decoder_intermediate_size=2 * width,
        keep_ratio=args.keep_ratio,
        keep_weight=args.keep_weight,
    )
    return LavitTokenizer(cfg)


def load_trained_tokenizer(folder: str | Path) -> tuple[SeedTokenizer | LavitTokenizer, dict]:
    """``(tokenizer, features)`` from a folder :func:`main` wrote (weights + ``config.json``).

    The tokenizer comes back in eval mode (deterministic LaVIT selection, no dropout). ``features`` is the
    ``config.json`` entry describing its inputs, with the standardisation as tensors: ``mean`` / ``std``
    ``[C]`` (features are ``(x - mean) / std``, then ``pool_features(., pool)``), ``pool``, ``model``.
    """
    from safetensors.torch import load_file

    from mmcompress.tokenizers import TokenizerConfig

    folder = Path(folder)
    for f in ("config.json", "tokenizer.safetensors"):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder / f} is missing; allowed: a folder written by train_tokenizers")
    meta = json.loads((folder / "config.json").read_text())
    cfg = TokenizerConfig.from_dict(meta["tokenizer"])
    tok = SeedTokenizer(cfg) if isinstance(cfg, SeedConfig) else LavitTokenizer(cfg)
    tok.load_state_dict(load_file(str(folder / "tokenizer.safetensors")))
    if isinstance(tok, LavitTokenizer):
        tok.quantize.reset_ema_()  # non-persistent EMA statistics restart from the loaded rows
    feats = dict(meta["features"])
    std = feats.pop("standardisation")
    feats["mean"], feats["std"] = torch.tensor(std["mean"]), torch.tensor(std["std"])
    return tok.eval(), feats


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean()


class SeedPhase1:
    """Phase-1 stand-in for SEED's ITC: reconstruct the patch features from the 32 causal embeddings."""

    def __init__(self, tok: SeedTokenizer, n_patches: int, width: int, heads: int) -> None:
        h = tok.config.qformer_hidden_size
        self.decoder = LavitFeatureDecoder(h, width, n_patches, depth=2, heads=heads, hidden=2 * width)
        self.tok = tok

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        q = self.tok.causal_embeddings(x)  # [B, 32, H]
        counts = torch.full((x.shape[0],), q.shape[1], dtype=torch.long)
        recon = self.decoder(q.reshape(-1, q.shape[-1]), counts)
        cos = _cosine(recon, x)
        return 1 - cos, {"rec_cos": float(cos.detach())}


def phase2_seed_loss(tok: SeedTokenizer, x: torch.Tensor) -> tuple[torch.Tensor, dict, object]:
    out = tok(features=x)
    losses = tok.losses(out, image_target=x.mean(dim=1))
    return losses["total"], {k: float(v.detach()) for k, v in losses.items()}, out


def lavit_loss(tok: LavitTokenizer, x: torch.Tensor, quantize: bool) -> tuple[torch.Tensor, dict, object]:
    out = tok(features=x, quantize=quantize)
    losses = tok.losses(out)
    logs = {k: float(v.detach()) for k, v in losses.items()}
    logs["tokens"] = float(out.counts.float().mean())
    return losses["total"], logs, out


@torch.no_grad()
def evaluate(tok, feats: torch.Tensor, batch: int) -> dict:
    """Held-out reconstruction, token counts and codebook usage (eval mode: deterministic LaVIT selection)."""
    tok.eval()
    all_ids, counts, cos = [], [], []
    for s in range(0, feats.shape[0], batch):
        x = feats[s : s + batch]
        if isinstance(tok, SeedTokenizer):
            out = tok(features=x)
            all_ids.append(out.ids.reshape(-1))
            counts += [out.ids.shape[1]] * x.shape[0]
            cos.append(float(_cosine(tok.reconstruct_causal(out.quantized), out.causal_embeds)) * x.shape[0])
        else:
            out = tok(features=x, sample=False)
            all_ids.append(out.ids)
            counts += out.counts.tolist()
            cos.append(float(_cosine(tok.reconstruct(out.quantized, out.counts), x)) * x.shape[0])
    ids = torch.cat(all_ids)
    c = np.array(counts)
    return {
        "reconstruction_cosine": sum(cos) / feats.shape[0],
        "reconstruction_target": "causal embeddings" if isinstance(tok, SeedTokenizer) else "patch features",
        "tokens_per_image": {
            "mean": float(c.mean()),
            "min": int(c.min()),
            "max": int(c.max()),
            "quantiles_10_50_90": [float(q) for q in np.quantile(c, [0.1, 0.5, 0.9])],
            "histogram": dict(zip(*[a.tolist() for a in np.unique(c, return_counts=True)])),
        },
        "codebook_usage": codebook_usage(ids, tok.config.codebook_size),
    }


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _run_phase(name, steps, params, loss_fn, args, rng, n_train, after_step=None) -> list[dict]:
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    log, ema = [], {}
    warmup = min(args.warmup, max(1, steps // 10))
    for step in tqdm(range(steps), desc=name, mininterval=10):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, args.lr, warmup)
        idx = torch.from_numpy(rng.choice(n_train, size=min(args.batch, n_train), replace=False))
        loss, logs, extra = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if after_step is not None:
            after_step(extra)
        for k, v in logs.items():
            ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
        if step % 50 == 0 or step == steps - 1:
            log.append({"phase": name, "step": step, **{k: round(v, 4) for k, v in ema.items()}})
            print(json.dumps(log[-1]), flush=True)
    return log


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, choices=("seed", "lavit"))
    p.add_argument(
        "--images", type=int, default=3000, help="cached training images (the last --eval-images held out)"
    )
    p.add_argument("--eval-images", type=int, default=200)
    p.add_argument("--steps", type=int, default=3000, help="total optimisation steps (both phases)")
    p.add_argument("--phase1-steps", type=int, default=None, help="default: 40%% of --steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--codebook-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256, help="SEED Q-Former width")
    p.add_argument(
        "--layers", type=int, default=2, help="Q-Former layers (SEED) / merger and decoder blocks (LaVIT)"
    )
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--pool", type=int, default=None, help="p x p patch pooling (default: 1 SEED, 2 LaVIT)")
    p.add_argument("--keep-ratio", type=float, default=0.5, help="LaVIT target keep ratio rho")
    p.add_argument("--keep-weight", type=float, default=2.0, help="LaVIT keep-ratio weight lambda")
    p.add_argument(
        "--codebook-init",
        choices=("kmeans", "official"),
        default="kmeans",
        help="SEED phase 2: k-means on the task layer's outputs (default) or the official uniform "
        "(-1/K, 1/K) init, which collapsed to 12 of 1024 codes here",
    )
    p.add_argument(
        "--dead-code-restart",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SEED phase 2: move codes unused for ~60 steps onto batch encoder outputs",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--feature-cache", type=Path, default=None, help="folder to keep tower features")
    p.add_argument("--out", type=Path, default=None, help="weights folder (default runs/tokenizers/...)")
    p.add_argument("--results", type=Path, default=None, help="JSON path (default evals/results/...)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for field in ("images", "eval_images", "steps", "batch", "codebook_size", "hidden", "layers", "heads"):
        if getattr(args, field) < 1:
            raise ValueError(f"--{field.replace('_', '-')}={getattr(args, field)} is invalid; allowed: >= 1")
    if args.eval_images >= args.images:
        raise ValueError(f"--eval-images={args.eval_images} is invalid; allowed: < --images ({args.images})")
    if args.pool is None:
        args.pool = 1 if args.tokenizer == "seed" else 2
    if args.pool < 1 or GRID % args.pool:
        allowed = [d for d in range(1, GRID + 1) if GRID % d == 0]
        raise ValueError(f"--pool={args.pool} does not divide the {GRID}x{GRID} grid; allowed: {allowed}")
    if args.phase1_steps is None:
        args.phase1_steps = round(0.4 * args.steps)
    if not 0 <= args.phase1_steps <= args.steps:
        raise ValueError(f"--phase1-steps={args.phase1_steps} is invalid; allowed: 0..--steps ({args.steps})")

    t_start = time.time()
    torch.set_num_threads(args.threads)
    ts._set_seed(args.seed)
    name = f"shapes-{args.tokenizer}"
    out_dir = args.out or RUNS_DIR / name
    results_path = args.results or RESULTS_DIR / f"train_tokenizer_{args.tokenizer}.json"

    # tower features exactly as train_shapes caches them: (N, 1, 576, 768) fp16
    model, processor, _ = ts.build_untrained(NAME)
    t0 = time.time()
    data = ts.precompute(model, processor, NAME, args.images, 1, args.seed, args.feature_cache)
    t_features = time.time() - t0
    del model
    mu, sd = ts.feature_stats(data["feats"])
    feats = pool_features((data["feats"][:, 0].float() - mu) / sd, args.pool)  # standardised, [N, P, C]
    del data
    n_train = feats.shape[0] - args.eval_images
    train, held = feats[:n_train], feats[n_train:]
    width, n_patches = feats.shape[-1], feats.shape[1]
    print(f"features {tuple(feats.shape)} (pool {args.pool}) in {t_features:.0f} s", flush=True)

    tok = build_tokenizer(args, width)
    rng = np.random.default_rng(args.seed + 1)
    restarts: list[int] = []  # SEED phase 2: codes restarted per step
    steps2 = args.steps - args.phase1_steps
    t_train0 = time.time()
    if isinstance(tok, SeedTokenizer):
        helper = SeedPhase1(tok, n_patches, width, args.heads)
        tok.train()
        p1 = list(tok.ln_vision.parameters()) + [tok.query_tokens] + list(tok.qformer.parameters())
        log = _run_phase(
            "phase1",
            args.phase1_steps,
            p1 + list(helper.decoder.parameters()),
            lambda idx: (*helper.loss(train[idx]), None),
            args,
            rng,
            n_train,
        )
        for prm in p1:  # stage 2: the causal Q-Former is frozen (§2.4)
            prm.requires_grad_(False)
        tok.qformer.eval()  # no dropout on a frozen Q-Former
        if args.codebook_init == "kmeans":
            with torch.no_grad():  # Euclidean k-means on the task layer's outputs at the start of phase 2
                zs = torch.cat(
                    [tok(features=train[s : s + args.batch]).z for s in range(0, n_train, args.batch)]
                )
                tok.quantize.embedding.weight.copy_(
                    kmeans(zs, tok.config.codebook_size, iters=10, cosine=False, seed=args.seed)
                )
        p2 = [prm for prm in tok.parameters() if prm.requires_grad]

        def restart_step(out) -> None:
            if args.dead_code_restart:
                restarts.append(tok.quantize.restart_dead_(out.z, out.ids))

        log += _run_phase(
            "phase2",
            steps2,
            p2,
            lambda idx: phase2_seed_loss(tok, train[idx]),
            args,
            rng,
            n_train,
            restart_step,
        )
    else:
        tok.train()
        log = _run_phase(
            "phase1",
            args.phase1_steps,
            list(tok.parameters()),
            lambda idx: lavit_loss(tok, train[idx], quantize=False),
            args,
            rng,
            n_train,
        )
        tok.token_predictor.requires_grad_(False)  # phase 2: the selector is frozen (§3.4)
        with torch.no_grad():  # k-means codebook init on phase-1 encoder outputs
            zs = [
                tok(features=train[s : s + args.batch], quantize=False).z
                for s in range(0, n_train, args.batch)
            ]
            zs = torch.cat(zs)
            book = kmeans(zs, tok.config.codebook_size, iters=10, cosine=True, seed=args.seed)
            tok.quantize.embedding.weight.copy_(book)
            tok.quantize.reset_ema_()
        p2 = [
            prm for n_, prm in tok.named_parameters() if prm.requires_grad and not n_.startswith("quantize.")
        ]

        def ema_step(out) -> None:
            tok.quantize.ema_update(out.z.detach(), out.ids, decay=0.99, dead_threshold=0.05)

        log += _run_phase(
            "phase2",
            steps2,
            p2,
            lambda idx: lavit_loss(tok, train[idx], quantize=True),
            args,
            rng,
            n_train,
            ema_step,
        )
    t_train = time.time() - t_train0

    t0 = time.time()
    result = evaluate(tok, held, args.batch)
    t_eval = time.time() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in tok.state_dict().items()}, str(out_dir / "tokenizer.safetensors")
    )
    (out_dir / "config.json").write_text(
        json.dumps(
            {
                "tokenizer": tok.config.to_dict(),
                "features": {
                    "model": NAME,
                    "vision_feature_layer": [4, -1],
                    "pool": args.pool,
                    "standardisation": {"mean": mu.tolist(), "std": sd.tolist()},
                },
            }
        )
        + "\n"
    )
    report = {
        "model": name,
        "test_accuracy": None,  # an LLM reading the ids is trained in a later step
        "test_accuracy_per_family": None,
        "held_out": {"images": args.eval_images, **result},
        "dead_code_restarts": sum(restarts),
        "tokenizer_config": tok.config.to_dict(),
        "trainable_parameters": sum(x.numel() for x in tok.parameters()),
        "hyper_parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_time_s": {
            "features": round(t_features, 1),
            "train": round(t_train, 1),
            "eval": round(t_eval, 1),
            "total": round(time.time() - t_start, 1),
        },
        **ts.run_environment(args.threads),
        "train_log": log,
    }
    print(
        json.dumps({k: result[k] for k in ("reconstruction_cosine", "codebook_usage")}, indent=2), flush=True
    )
    return ts.write_report(report, results_path)


if __name__ == "__main__":
    main()
