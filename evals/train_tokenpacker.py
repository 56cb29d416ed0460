"""Train a TokenPacker projector (scale 2 / 3 / 4) for the embedded ``shapes-llava`` and fine-tune its LM.

    python -m mmcompress.evals.train_tokenpacker --scale 2      # 576 -> 144 visual tokens
    python -m mmcompress.evals.train_tokenpacker --scale 4 --feature-cache ~/.cache/mmcompress/features
    python -m mmcompress.evals.train_tokenpacker --scale 2 --images 16 --steps 3 --eval-n 8 \\
        --out /tmp/tp --results /tmp/tp.json                    # smoke test

Spec ``specs/tokenpacker-seed-lavit.md`` §1.5 (recipe) on the embedded model: the DINOv2 ViT-S/14 tower
at 336 px gives a 24x24 grid; TokenPacker reads ``hidden_states[4] ⊕ hidden_states[-1]`` (768-d, the
model's ``vision_feature_layer``) as keys / values and the final layer as point queries, so it makes
``(24/s)^2`` = 144 / 64 / 36 tokens. The official two stages become two phases of one run: the first
``--align-steps`` train the projector only (stage 1, LLM frozen), then projector and LM together
(stage 2, the LM at ``--lm-lr``), starting from the shipped ``shapes-llava`` LM.

Everything else is ``train_shapes``' machinery: cached tower features, :class:`SequenceBuilder`,
:func:`train_step_loss`, :func:`evaluate`, per-channel standardisation of the features (folded into the
first key / value Linear before saving, exactly; the query path has no bias to fold into, so it reads raw
features) and the optional per-patch auxiliary heads, here on the packed ``(24/s)^2`` grid.

Writes a checkpoint folder (``--out``, default ``runs/tokenpacker/shapes-llava-s<scale>``, loadable
with :func:`mmcompress.projectors.load_tokenpacker_llava`), evaluates that reloaded checkpoint through
``generate()`` and writes ``evals/results/train_tokenpacker_s<scale>.json``.
"""

from __future__ import annotations

import argparse
import json
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
    from evals.shapes_patch_labels import LABEL_CLASSES, patch_labels  # type: ignore[no-redef]
    from evals.shapesvqa import ShapesVQA  # type: ignore[no-redef]
else:
    from . import train_shapes as ts
    from .shapes_patch_labels import LABEL_CLASSES, patch_labels
    from .shapesvqa import ShapesVQA

from mmcompress.projectors import (
    LlavaTokenPacker,
    install_tokenpacker,
    load_tokenpacker_llava,
    save_tokenpacker_llava,
)
from mmcompress.projectors.tokenpacker import check_scale
from mmcompress.zoo import build as zoo_build
from mmcompress.zoo.paths import shipped_weights_dir
from mmcompress.zoo.specs import SPECS
from mmcompress.zoo.text import build_prompt

NAME = "shapes-llava"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUNS_DIR = Path(__file__).resolve().parents[1] / "runs" / "tokenpacker"


class StandardisedInput(torch.nn.Module):
    """Training-time projector: stacked features standardised per channel -> TokenPacker.

    ``forward(x_std [B, N, n_in*C])``: keys / values read the standardised multi-level channels; the point
    queries read the query layer de-standardised back to raw features (``q_proj_1`` has no bias, so a
    standardisation could not be folded into it). After training :meth:`fold` makes the packer act on raw
    features alone: ``W' = W / sd``, ``b' = b - W' mu`` on ``k_proj_1.0`` and ``v_proj_1.0`` (exact).
    """

    def __init__(self, packer: LlavaTokenPacker, mu: torch.Tensor, sd: torch.Tensor) -> None:
        super().__init__()
        self.packer = packer
        c, lv = packer.config.vision_hidden_size, packer.config.num_levels
        q = slice(packer.query_level * c, (packer.query_level + 1) * c)
        self.register_buffer("mu_q", mu[q].clone(), persistent=False)
        self.register_buffer("sd_q", sd[q].clone(), persistent=False)
        self.kv = lv * c
        self._mu_kv, self._sd_kv = mu[: self.kv].clone(), sd[: self.kv].clone()

        cfg = packer.config
        self.n_in = mu.numel()
        self.shim_width = cfg.raw_grid**2 * self.n_in // cfg.num_tokens

    def pseudo_views(self, feats: torch.Tensor) -> torch.Tensor:
        """``[B, 1, N, D] -> [B, M, 1, N*D/M]`` (see the class docstring)."""
        return feats.reshape(feats.shape[0], self.packer.num_tokens, 1, self.shim_width)

    def forward(self, x_std: torch.Tensor) -> torch.Tensor:
        shimmed = x_std.shape[-2] == 1 and x_std.shape[-1] == self.shim_width
        if shimmed:  # [B*M, 1, N*D/M] from visual_embeds
            x_std = x_std.reshape(-1, self.packer.config.raw_grid**2, self.n_in)
        c, q = self.packer.config.vision_hidden_size, self.packer.query_level
        single = x_std[..., q * c : (q + 1) * c] * self.sd_q + self.mu_q
        out = self.packer(single, x_std[..., : self.kv])  # [B, M, H]
        return out.reshape(-1, 1, out.shape[-1]) if shimmed else out

    @torch.no_grad()
    def fold(self) -> LlavaTokenPacker:
        for mlp in (self.packer.k_proj_1, self.packer.v_proj_1):
            ts.fold_standardisation(mlp[0], self._mu_kv, self._sd_kv)
        return self.packer


def _load_shipped_lm(model, name: str) -> int:
    """Copy the shipped LM (and everything else whose name and shape still match) into ``model``."""
    from safetensors.torch import load_file

    src = shipped_weights_dir(name) / zoo_build.SHIPPED_WEIGHTS_FILE
    init = {k: v.float() for k, v in load_file(str(src)).items()}
    own = model.state_dict()
    usable = {k: v for k, v in init.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return len(usable)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=int, default=2, help="TokenPacker scale factor s: (24/s)^2 visual tokens")
    p.add_argument(
        "--feature-layers",
        type=int,
        nargs="+",
        default=None,
        help="tower hidden states for keys/values (default: the model's vision_feature_layer, 4 -1)",
    )
    p.add_argument(
        "--query-layer", type=int, default=None, help="hidden state of the point queries (default -1)"
    )
    p.add_argument("--images", type=int, default=3000, help="training images (tower run once each)")
    p.add_argument("--qas", type=int, default=24, help="QA pool size per training image")
    p.add_argument("--qas-per-seq", type=int, default=12, help="QA pairs packed after the image")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument(
        "--align-steps",
        type=int,
        default=None,
        help="first steps train the projector only (default: 15%% of --steps, 300 of 2000)",
    )
    p.add_argument("--batch", type=int, default=8, help="sequences (images) per step")
    p.add_argument("--lr", type=float, default=1e-3, help="projector (and aux heads) peak learning rate")
    p.add_argument(
        "--lm-lr", type=float, default=3e-4, help="LM peak learning rate after the alignment phase"
    )
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--time-budget-min", type=float, default=0.0, help="stop early after this many minutes")
    p.add_argument(
        "--init-from",
        default=NAME,
        choices=(NAME, "none"),
        help="start the LM from the shipped shapes-llava weights, or from scratch",
    )
    p.add_argument("--feature-cache", type=Path, default=None, help="folder to keep tower features")
    p.add_argument("--out", type=Path, default=None, help="checkpoint folder (default runs/tokenpacker/...)")
    p.add_argument("--results", type=Path, default=None, help="JSON path (default evals/results/...)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--aux-weight", type=float, default=1.0, help="per-token auxiliary heads (0 = off)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    for field in ("images", "qas", "qas_per_seq", "steps", "batch", "eval_n"):
        if getattr(args, field) < 1:
            raise ValueError(f"--{field.replace('_', '-')}={getattr(args, field)} is invalid; allowed: >= 1")
    if args.align_steps is None:
        args.align_steps = round(0.15 * args.steps)
    if not 0 <= args.align_steps <= args.steps:
        raise ValueError(f"--align-steps={args.align_steps} is invalid; allowed: 0..--steps ({args.steps})")
    check_scale(args.scale, SPECS[NAME].image_size // 14, "--scale")  # DINOv2 /14: a 24x24 grid
    if args.aux_weight < 0:
        raise ValueError(f"--aux-weight={args.aux_weight} is invalid; allowed: >= 0")

    t_start = time.time()
    torch.set_num_threads(args.threads)
    ts._set_seed(args.seed)
    spec = SPECS[NAME]
    out_dir = args.out or RUNS_DIR / f"{NAME}-s{args.scale}"
    results_path = args.results or RESULTS_DIR / f"train_tokenpacker_s{args.scale}.json"

    # the shipped LM's RoPE base, so that its weights see the positions they were trained with
    theta = ts.weights_rope_theta(shipped_weights_dir(args.init_from)) if args.init_from != "none" else 1e4
    model, processor, tok = ts.build_untrained(NAME, rope_theta=theta)
    packer = install_tokenpacker(
        model, processor, scale=args.scale, feature_layers=args.feature_layers, query_layer=args.query_layer
    )
    if args.init_from != "none":
        n = _load_shipped_lm(model, args.init_from)
        print(f"initialised {n} tensors from the shipped {args.init_from}", flush=True)
    model.model.vision_tower.requires_grad_(False)
    model.model.vision_tower.eval()
    stack = list(model.config.vision_feature_layer)
    n_tok = packer.num_tokens
    print(
        f"TokenPacker s={args.scale}: layers {stack} (query slot {packer.query_level}), {n_tok} tokens",
        flush=True,
    )

    # The features cached by train_shapes are hidden_states[4] ⊕ [12]: reuse them for that stack only.
    cache = args.feature_cache
    if cache is not None and stack != [4, model.config.vision_config.num_hidden_layers]:
        cache = cache / ("layers-" + "_".join(map(str, stack)))
    t0 = time.time()
    data = ts.precompute(model, processor, NAME, args.images, args.qas, args.seed, cache)
    t_features = time.time() - t0
    feats, image_sizes, qas = data["feats"], data["image_sizes"], data["qas"]
    mu, sd = ts.feature_stats(feats)
    train_proj = StandardisedInput(packer, mu, sd)
    model.model.multi_modal_projector = train_proj  # what train_step_loss -> visual_embeds calls

    # The processor must emit exactly the packed token count, in the training sequence layout.
    builder = ts.SequenceBuilder(tok)
    q0 = qas[0][0]
    ds0, i0 = ts._datasets(NAME, "train", 1, args.seed)[0]
    ref = processor(images=ds0[i0].image, text=build_prompt(q0[0]), return_tensors="pt")["input_ids"][0]
    if builder.build(n_tok, [q0])[0][: len(ref)] != ref.tolist():
        raise RuntimeError("training sequence layout differs from the processor's prompt")

    heads, labels = None, None
    if args.aux_weight > 0:
        g, cell = packer.config.grid, model.config.vision_config.patch_size * args.scale
        # one label per packed token: its s x s patch cell (14*s px) of the 336 px image
        labels, _scenes = patch_labels(
            ShapesVQA("train", n=args.images, seed=args.seed, image_size=spec.image_size),
            args.images,
            g,
            cell,
        )
        heads = torch.nn.ModuleDict(
            {k: torch.nn.Linear(spec.hidden_size, c) for k, c in LABEL_CLASSES(g).items()}
        )

    proj_params = list(packer.parameters()) + (list(heads.parameters()) if heads is not None else [])
    lm_params = [
        p_
        for n_, p_ in model.named_parameters()
        if not n_.startswith(("model.vision_tower.", "model.multi_modal_projector."))
    ]
    groups = []
    for params, lr in ((proj_params, args.lr), (lm_params, args.lm_lr)):
        groups += [
            {"params": [x for x in params if x.dim() >= 2], "weight_decay": args.weight_decay, "base_lr": lr},
            {"params": [x for x in params if x.dim() < 2], "weight_decay": 0.0, "base_lr": lr},
        ]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    n_proj = sum(x.numel() for x in packer.parameters())
    n_lm = sum(x.numel() for x in lm_params)
    print(f"trainable: projector {n_proj / 1e6:.2f} M, LM {n_lm / 1e6:.2f} M", flush=True)

    rng = np.random.default_rng(args.seed + 1)
    model.train()
    model.model.vision_tower.eval()
    t_train0 = time.time()
    log, ema, steps_done = [], {}, 0

    def smooth(k: str, v: float) -> float:
        ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
        return ema[k]

    bar = tqdm(range(args.steps), desc=f"train tokenpacker s={args.scale}", mininterval=10)
    for step in bar:
        aligning = step < args.align_steps  # official stage 1: the LLM is frozen
        for x in lm_params:
            x.requires_grad_(not aligning)
        idx = rng.choice(len(feats), size=min(args.batch, len(feats)), replace=False)
        seqs = []
        for j in idx:
            pool = qas[int(j)]
            order = rng.permutation(len(pool))[: args.qas_per_seq]
            seqs.append(builder.build(n_tok, [pool[k] for k in order]))
        mult = ts._lr_at(step, args.steps, 1.0, args.warmup)
        for grp in opt.param_groups:
            grp["lr"] = grp["base_lr"] * mult
        batch_feats = (feats[idx].float() - mu) / sd
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss, correct, total, w_correct, w_total = ts.train_step_loss(
                model,
                NAME,
                train_proj.pseudo_views(batch_feats),
                image_sizes[idx],
                seqs,
                tok.image_token_id,
                tok.pad_token_id,
                tok.eos_token_id,
            )
            aux = torch.zeros(())
            if heads is not None:
                vis = train_proj(batch_feats.flatten(1, 2))  # [B, M, H]
                aux = sum(
                    F.cross_entropy(h(vis).flatten(0, 1).float(), labels[k][idx].flatten())
                    for k, h in heads.items()
                ) / len(heads)
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_([x for x in proj_params + lm_params if x.grad is not None], 1.0)
        opt.step()
        steps_done = step + 1
        row = {
            "loss": smooth("loss", loss.item()),
            "answer_token_acc": smooth("acc", correct / max(total, 1)),
            "answer_word_acc": smooth("word", w_correct / max(w_total, 1)),
            "aux_loss": smooth("aux", aux.item()),
        }
        bar.set_postfix(
            loss=f"{row['loss']:.3f}",
            word_acc=f"{row['answer_word_acc']:.3f}",
            phase="align" if aligning else "joint",
        )
        if step % 50 == 0 or step == args.steps - 1:
            log.append(
                {
                    "step": step,
                    **{k: round(v, 4) for k, v in row.items()},
                    "lr_multiplier": mult,
                    "phase": "align" if aligning else "joint",
                    "elapsed_s": round(time.time() - t_train0, 1),
                }
            )
            print(json.dumps(log[-1]), flush=True)
        if args.time_budget_min and time.time() - t_start > 60 * args.time_budget_min:
            print(f"time budget reached after {steps_done} steps", flush=True)
            break
    t_train = time.time() - t_train0
    del feats, data

    model.eval()
    model.model.multi_modal_projector = train_proj.fold()
    save_tokenpacker_llava(model, processor, out_dir)
    print(f"saved the checkpoint to {out_dir}", flush=True)

    # Evaluate what users get: the saved checkpoint loaded back.
    t0 = time.time()
    eval_model, eval_proc = load_tokenpacker_llava(out_dir)
    result = ts.evaluate(eval_model, eval_proc, NAME, args.eval_n, args.seed)
    t_eval = time.time() - t0

    report = {
        "model": f"{NAME} + TokenPacker s={args.scale}",
        "test_accuracy": result["overall"],
        "test_accuracy_per_family": result["per_family"],
        "test_n_per_family": result["n_per_family"],
        "eval": {
            "split": "test",
            "n": args.eval_n,
            "seed": args.seed,
            "path": "generate(), greedy, max_new_tokens=4",
            "image_size": spec.image_size,
        },
        "visual_tokens_per_image": n_tok,
        "tokenpacker": dict(model.config.tokenpacker),
        "hyper_parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "checkpoint": str(out_dir),
        "steps_done": steps_done,
        "trainable_parameters": {"projector": n_proj, "language_model": n_lm},
        "wall_time_s": {
            "features": round(t_features, 1),
            "train": round(t_train, 1),
            "eval": round(t_eval, 1),
            "total": round(time.time() - t_start, 1),
        },
        **ts.run_environment(args.threads),
        "train_log": log,
        "examples": result["examples"],
    }
    return ts.write_report(report, results_path)


if __name__ == "__main__":
    main()
