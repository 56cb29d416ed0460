"""Train a language model that reads SEED / LaVIT discrete image ids and answers ShapesVQA (phase 3).

    python -m mmcompress.evals.train_tokenizer_lm --tokenizer-dir runs/tokenizers/shapes-seed \\
        --feature-cache ~/.cache/mmcompress/features
    python -m mmcompress.evals.train_tokenizer_lm --tokenizer-dir /tmp/tok --feature-cache /tmp/cache \\
        --smoke --out /tmp/lm --results /tmp/lm.json                  # smoke test (16 images, 2 steps)

Issue 6, spec ``specs/tokenpacker-seed-lavit.md`` §2.5 (SEED-LLaMA: image codes are extra vocabulary rows
the LLM reads like words) and §3.1 step 6 (LaVIT's id layout). Phases 1-2 (the tokenizer) are
``train_tokenizers``; this is phase 3, the LM. The image is text here, with no projector::

    <s> <boi> code_1 ... code_k <eoi> question: q1 answer: a1 </s> question: q2 answer: a2 </s> ...

Steps: (1) load a tokenizer folder written by ``train_tokenizers`` (:func:`load_trained_tokenizer`) and
encode the cached tower features of the training images once, with its own standardisation and pooling
(deterministic inference: SEED always 32 ids, LaVIT the argmax keep decision, a dynamic count per image);
(2) start from the shipped ``shapes-llava`` language model (a ``LlamaForCausalLM`` built from its text
config and shipped weights) and its word tokenizer; :meth:`extend_vocab` adds the code tokens and the
begin / end image tokens in the tokenizer's layout (SEED: codes then ``<img>`` ``</img>``; LaVIT:
``[IMG]`` ``[/IMG]`` then codes); (3) train on ``train_shapes``' packed multi-QA sequences
(:class:`~train_shapes.SequenceBuilder` with the image run replaced by the ids, and
:func:`~train_shapes.train_step_loss`: loss on answers and ``</s>`` only, block mask so each QA sees the
image and itself); (4) evaluate greedy ``generate()`` on the ShapesVQA test split per family, tokens per
image and codebook usage on the test images; (5) write ``evals/results/train_tokenizer_lm_<kind>.json``
with the comparison against the continuous ``shapes-llava`` (read from its own training report).

Choices (ours; the official models train far larger LLMs on captions first):

* **New rows.** The input rows of the codes are a learned linear map of the tokenizer's code embeddings
  (``decode_embeddings``: SEED ``decode_task_layer(codebook)``, LaVIT the cosine codebook rows), columns
  standardised, plus a free per-code residual that starts at zero (:class:`ImageRows`). Codes close in the
  tokenizer's space start close in the LM; the map is trained with everything else and folded into a
  plain embedding matrix before evaluation and saving (:func:`fold_image_rows`, exact). The map is
  initialised so the rows have the per-dimension spread of the LM's word rows. Official SEED-LLaMA
  instead trains free rows from the resize init (§2.6).
* **Trained.** All of the LM (embeddings, decoder layers, head) plus the image rows: the shipped LM read
  576 continuous tokens, so ids are a new input distribution for every layer, and the LM is small.
* Without per-patch labels for codes, ``train_shapes``' auxiliary heads and retrieval loss do not apply.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

if __package__ in (None, ""):  # run as a file: make the repo importable (evals/ installs as mmcompress.evals)
    _ROOT = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(_ROOT))
    from evals import train_shapes as ts  # type: ignore[no-redef]
    from evals.shapesvqa import FAMILIES, score  # type: ignore[no-redef]
    from evals.train_tokenizers import load_trained_tokenizer, pool_features  # type: ignore[no-redef]
else:
    from . import train_shapes as ts
    from .shapesvqa import FAMILIES, score
    from .train_tokenizers import load_trained_tokenizer, pool_features

from mmcompress.tokenizers import LavitTokenizer, SeedTokenizer, VocabLayout, codebook_usage
from mmcompress.zoo.build import SHIPPED_WEIGHTS_FILE
from mmcompress.zoo.paths import shipped_weights_dir
from mmcompress.zoo.text import answer_from_text

NAME = "shapes-llava"  # the embedded model whose tower features, LM and word tokenizer are used
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUNS_DIR = Path(__file__).resolve().parents[1] / "runs" / "tokenizer_lm"
#: ``--smoke`` settings: train_tokenizers' documented smoke run caches 16 images, so this reuses them.
SMOKE = {"images": 16, "qas": 4, "qas_per_seq": 2, "steps": 2, "batch": 2, "eval_n": 7, "warmup": 1}


# -- the language model ------------------------------------------------------------------------------
def load_text_lm(name: str = NAME) -> tuple[Any, Any]:
    """``(LlamaForCausalLM, word tokenizer)`` of an embedded model's shipped language model (fp32).

    The LLaVA checkpoint's ``model.language_model.*`` and ``lm_head.*`` tensors are loaded strictly into a
    ``LlamaForCausalLM`` built from its ``text_config``; the projector is not used (the image is text).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    src = shipped_weights_dir(name)
    lm = LlamaForCausalLM(AutoConfig.from_pretrained(src).text_config)
    prefix = "model.language_model."
    state = {}
    for k, v in load_file(str(src / SHIPPED_WEIGHTS_FILE)).items():
        if k.startswith(prefix):
            state["model." + k[len(prefix) :]] = v.float()
        elif k.startswith("lm_head."):
            state[k] = v.float()
    lm.load_state_dict(state)  # strict: every LM tensor must be shipped
    text_tok = AutoTokenizer.from_pretrained(src)
    lm.generation_config.update(
        pad_token_id=text_tok.pad_token_id,
        eos_token_id=text_tok.eos_token_id,
        bos_token_id=text_tok.bos_token_id,
        max_new_tokens=4,
        do_sample=False,
    )
    return lm.eval(), text_tok


class ImageRows(nn.Module):
    """LM input rows of the image tokens: codes through a learned linear map, BOI / EOI free.

    Args:
        code_embeddings: ``[K, c]`` the tokenizer's code embeddings (fixed; standardised per column here
            so the map starts well conditioned).
        width: the LM hidden size ``W``.
        scale: per-dimension std of the initial rows (the LM's word rows' std).
        residual: add a free ``[K, W]`` per-code residual (zero at init) to the mapped rows.

    ``forward() -> (codes [K, W], special [2, W])`` with ``special`` = (BOI, EOI).
    """

    def __init__(
        self, code_embeddings: torch.Tensor, width: int, scale: float, residual: bool = True
    ) -> None:
        super().__init__()
        e = code_embeddings.detach().float()
        e = (e - e.mean(0)) / e.std(0, unbiased=False).clamp_min(1e-6)
        self.register_buffer("codes", e, persistent=False)
        self.proj = nn.Linear(e.shape[1], width)
        with torch.no_grad():  # unit-variance inputs: std(W x) = scale
            self.proj.weight.normal_(0.0, scale / math.sqrt(e.shape[1]))
            self.proj.bias.zero_()
        self.residual = nn.Parameter(torch.zeros(e.shape[0], width)) if residual else None
        self.special = nn.Parameter(torch.randn(2, width) * scale)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.proj(self.codes)
        if self.residual is not None:
            rows = rows + self.residual
        return rows, self.special


class ImageTokenEmbedding(nn.Module):
    """The LM's ``embed_tokens`` during training: word rows from its table, image rows from
    :class:`ImageRows` (``ids [...] -> [..., W]``). :meth:`fold` writes the image rows into the table."""

    def __init__(self, base: nn.Embedding, layout: VocabLayout, rows: ImageRows) -> None:
        super().__init__()
        if base.weight.shape[0] != layout.vocab_size:
            raise ValueError(
                f"embedding has {base.weight.shape[0]} rows, the layout vocab_size={layout.vocab_size}"
            )
        self.base, self.rows = base, rows
        idx = torch.tensor([*layout.code_range, layout.boi_id, layout.eoi_id])
        self.register_buffer("image_idx", idx, persistent=False)

    def table(self) -> torch.Tensor:
        """``[V, W]``: the base table with the image rows replaced (out of place, so both get gradients)."""
        codes, special = self.rows()
        w = self.base.weight
        return w.index_copy(0, self.image_idx, torch.cat([codes, special]).to(w.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table())

    @torch.no_grad()
    def fold(self) -> nn.Embedding:
        self.base.weight.copy_(self.table())
        return self.base


def extend_lm(
    lm: Any, text_tok: Any, tok: SeedTokenizer | LavitTokenizer, residual: bool = True
) -> tuple[VocabLayout, ImageRows]:
    """Add the image tokens to ``text_tok`` / ``lm`` (:meth:`extend_vocab`, the tokenizer's own layout) and
    install :class:`ImageRows` initialised from ``tok.decode_embeddings`` of every code."""
    layout = tok.extend_vocab(text_tok, lm, mean_resizing=False)
    base = lm.get_input_embeddings()
    words = base.weight[: min(layout.offset, layout.boi_id)].detach()
    with torch.no_grad():
        codes = tok.decode_embeddings(torch.arange(tok.config.codebook_size))
    rows = ImageRows(codes, base.weight.shape[1], float(words.std()), residual=residual)
    lm.set_input_embeddings(ImageTokenEmbedding(base, layout, rows))
    return layout, rows


def fold_image_rows(lm: Any) -> None:
    """Replace :class:`ImageTokenEmbedding` by the plain embedding holding the same rows (exact)."""
    emb = lm.get_input_embeddings()
    if isinstance(emb, ImageTokenEmbedding):
        lm.set_input_embeddings(emb.fold())


# -- ids and sequences -------------------------------------------------------------------------------
@torch.no_grad()
def encode_features(
    tok: SeedTokenizer | LavitTokenizer, feats: torch.Tensor, features: dict, chunk: int = 64
) -> list[torch.Tensor]:
    """Cached tower features ``[N, 1, P, C]`` (fp16, raw) -> per image its code ids ``[k_i]``.

    The tokenizer's standardisation and pooling (``features`` from :func:`load_trained_tokenizer`) are
    applied chunk by chunk (3000 images in fp32 would take 5 GB); LaVIT takes the deterministic argmax
    keep decision (``sample=False``).
    """
    tok.eval()
    out: list[torch.Tensor] = []
    for s in range(0, feats.shape[0], chunk):
        x = feats[s : s + chunk, 0].float()
        x = pool_features((x - features["mean"]) / features["std"], features["pool"])
        if isinstance(tok, SeedTokenizer):
            out += list(tok.encode(features=x))
        else:
            out += tok.encode(features=x, sample=False)
    return out


def build_sequence(
    builder: ts.SequenceBuilder, layout: VocabLayout, codes: torch.Tensor, qas: list[tuple[str, str, str]]
) -> tuple[list[int], ...]:
    """``train_shapes.SequenceBuilder.build`` with its image run replaced by ``<boi> codes <eoi>``.

    Returns ids, targets, segments, positions (each ``[L]``); segment 0 is ``<s>`` + the image ids.
    """
    image = layout.to_llm_ids(codes).tolist()
    ids, targets, segments, positions = builder.build(len(image), qas)
    ids[1 : 1 + len(image)] = image
    return ids, targets, segments, positions


def prompt_ids(
    builder: ts.SequenceBuilder, layout: VocabLayout, codes: torch.Tensor, question: str
) -> list[int]:
    """Inference prompt ``<s> <boi> codes <eoi> question: q answer:``: the training sequence of that one QA
    up to its first answer target, so evaluation sees exactly the training layout."""
    ids, targets, _, _ = build_sequence(builder, layout, codes, [(question, "yes", "")])
    first = next(i for i, t in enumerate(targets) if t != -100)
    return ids[: first + 1]


class _LlavaView:
    """What :func:`train_shapes.train_step_loss` reads of a LLaVA model, for a text-only LM.

    ``train_step_loss`` scatters projector outputs into ``<image>`` slots; these sequences have none (the
    image is ids), so the projector here gets a one-value dummy and nothing is scattered.
    """

    def __init__(self, lm: Any) -> None:
        width = lm.config.hidden_size
        self.model = SimpleNamespace(
            language_model=lm.model,
            multi_modal_projector=lambda x: x.new_zeros(x.shape[0], x.shape[1], width),
        )
        self.lm_head = lm.lm_head


def step_loss(lm: Any, text_tok: Any, seqs: list[tuple[list[int], ...]]) -> tuple:
    """``train_step_loss`` on packed id sequences: (loss, n_correct, n_targets, n_correct_words, n_words)."""
    image_token = text_tok.image_token_id
    if any(image_token in s[0] for s in seqs):
        raise ValueError(f"sequences hold the <image> placeholder (id {image_token}); the image must be ids")
    return ts.train_step_loss(
        _LlavaView(lm),
        NAME,
        torch.zeros(len(seqs), 1, 1, 1),
        None,
        seqs,
        image_token,
        text_tok.pad_token_id,
        text_tok.eos_token_id,
    )


def make_optimizer(lm: Any, lr: float, weight_decay: float, lm_lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over every parameter of ``lm`` as ``train_shapes`` (decay on matrices only); the new image rows
    (:class:`ImageRows`, when installed) at ``lr``, the shipped LM's own parameters at ``lm_lr`` (default
    ``lr``). Each group's ``scale`` is its rate over ``lr``, for the schedule: ``group lr = scale * lr(t)``.
    """
    emb = lm.get_input_embeddings()
    image = list(emb.rows.parameters()) if isinstance(emb, ImageTokenEmbedding) else []
    seen = {id(q) for q in image}
    shipped = [q for q in lm.parameters() if id(q) not in seen]
    scale = (lr if lm_lr is None else lm_lr) / lr
    groups = []
    for params, s in ((image, 1.0), (shipped, scale)):
        groups.append(
            {"params": [q for q in params if q.dim() >= 2], "weight_decay": weight_decay, "scale": s}
        )
        groups.append({"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0, "scale": s})
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = lr * g["scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


# -- evaluation --------------------------------------------------------------------------------------
@torch.no_grad()
def test_features(model: Any, processor: Any, samples: list, chunk: int = 8) -> torch.Tensor:
    """Tower features of test samples, as ``train_shapes.precompute`` caches them: ``[n, 1, P, 768]`` fp16."""
    out = []
    for s in tqdm(range(0, len(samples), chunk), desc="test tower features", mininterval=10):
        images = [x.image for x in samples[s : s + chunk]]
        pv = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        out.append(ts.tower_features(model, pv).to(torch.float16)[:, None])
    return torch.cat(out)


def count_stats(counts: list[int]) -> dict:
    """Tokens per image: mean / min / max / 10-50-90 % quantiles / histogram ``{count: images}``."""
    c = np.asarray(counts)
    values, n = np.unique(c, return_counts=True)
    return {
        "mean": float(c.mean()),
        "min": int(c.min()),
        "max": int(c.max()),
        "quantiles_10_50_90": [float(q) for q in np.quantile(c, [0.1, 0.5, 0.9])],
        "histogram": {int(v): int(k) for v, k in zip(values, n)},
    }


@torch.no_grad()
def evaluate(
    lm: Any,
    text_tok: Any,
    builder: ts.SequenceBuilder,
    layout: VocabLayout,
    codes: list[torch.Tensor],
    samples: list,
    batch_size: int = 16,
) -> dict:
    """Greedy ``generate()`` (``max_new_tokens=4``, left padding) on each sample with its image's ids;
    accuracy overall and per family (``train_shapes.evaluate``'s scoring), plus every prediction."""
    lm.eval()
    pad = text_tok.pad_token_id
    image_ids = {*layout.code_range, layout.boi_id, layout.eoi_id}
    hits: dict[str, list[float]] = {f: [] for f in FAMILIES}
    preds: list[str] = []
    for s in tqdm(range(0, len(samples), batch_size), desc="eval", mininterval=10):
        chunk = list(zip(codes[s : s + batch_size], samples[s : s + batch_size]))
        prompts = [prompt_ids(builder, layout, c, x.question) for c, x in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = lm.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=text_tok.eos_token_id,
        )
        for row, (_, x) in zip(out[:, width:], chunk):
            # image ids have no text (LaVIT codes have no token strings at all): drop them before decoding
            words = [t for t in row.tolist() if t not in image_ids]
            pred = answer_from_text(text_tok.decode(words, skip_special_tokens=False))
            preds.append(pred)
            hits[x.family].append(score(pred, x.answer))
    return {
        "overall": round(float(np.mean([h for v in hits.values() for h in v])), 4),
        "per_family": {f: round(float(np.mean(v)), 4) for f, v in hits.items() if v},
        "n_per_family": {f: len(v) for f, v in hits.items()},
        "predictions": preds,
    }


def continuous_baseline(path: Path) -> dict | None:
    """The continuous model's numbers from its training report, or None when the report is missing."""
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    return {
        "model": d["model"],
        "test_accuracy": d["test_accuracy"],
        "test_accuracy_per_family": d["test_accuracy_per_family"],
        "visual_tokens_per_image": d.get("visual_tokens_per_image"),
        "eval": d.get("eval"),
        # repo-relative when the report is the repo's own, so results do not name the machine's checkout
        "source": str(path.relative_to(RESULTS_DIR.parents[1]))
        if path.resolve().is_relative_to(RESULTS_DIR.parents[1].resolve())
        else str(path),
    }


# -- main --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer-dir", type=Path, required=True, help="a folder written by train_tokenizers")
    p.add_argument("--images", type=int, default=3000, help="training images (cached tower features)")
    p.add_argument("--qas", type=int, default=48, help="QA pool size per training image")
    p.add_argument("--qas-per-seq", type=int, default=16, help="QA pairs packed after the image")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8, help="sequences (images) per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the new image rows")
    p.add_argument(
        "--lm-lr",
        type=float,
        default=None,
        help="peak learning rate of the shipped LM's weights (default --lr)",
    )
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument(
        "--residual",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a free per-code residual on top of the linear map of the code embeddings",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=560, help="ShapesVQA test samples (as train_shapes)")
    p.add_argument(
        "--time-budget-min",
        type=float,
        default=0.0,
        help="stop training early (cosine schedule kept) once this many minutes have passed; 0 = off",
    )
    p.add_argument("--feature-cache", type=Path, default=None, help="folder of cached tower features")
    p.add_argument(
        "--out", type=Path, default=None, help="LM folder (default runs/tokenizer_lm/shapes-<kind>)"
    )
    p.add_argument("--results", type=Path, default=None, help="JSON path (default evals/results/...)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast for the LM (as train_shapes)",
    )
    p.add_argument("--smoke", action="store_true", help=f"tiny run for tests: {SMOKE}")
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    for field in ("images", "qas", "qas_per_seq", "steps", "batch", "eval_n", "threads"):
        if getattr(args, field) < 1:
            raise ValueError(f"--{field.replace('_', '-')}={getattr(args, field)} is invalid; allowed: >= 1")
    for field in ("lr", "lm_lr"):
        if getattr(args, field) is not None and not getattr(args, field) > 0:
            raise ValueError(f"--{field.replace('_', '-')}={getattr(args, field)} is invalid; allowed: > 0")
    if args.warmup < 0 or args.time_budget_min < 0:
        raise ValueError(
            f"--warmup={args.warmup} / --time-budget-min={args.time_budget_min} are invalid; allowed: >= 0"
        )

    t_start = time.time()
    torch.set_num_threads(args.threads)
    ts._set_seed(args.seed)
    tok, features = load_trained_tokenizer(args.tokenizer_dir)
    if features.get("model") != NAME:
        raise ValueError(
            f"{args.tokenizer_dir}: the tokenizer reads features of {features.get('model')!r}; "
            f"allowed: {NAME!r}"
        )
    kind = tok.config.name
    out_dir = args.out or RUNS_DIR / f"shapes-{kind}"
    results_path = args.results or RESULTS_DIR / f"train_tokenizer_lm_{kind}.json"

    # (1) tower features (cached for the training images) -> ids, once
    t0 = time.time()
    model, processor, _ = ts.build_untrained(NAME)
    data = ts.precompute(model, processor, NAME, args.images, args.qas, args.seed, args.feature_cache)
    samples = [ds[i] for ds, i in ts._datasets(NAME, "test", args.eval_n, args.seed)]
    test_feats = test_features(model, processor, samples)
    del model
    t_features = time.time() - t0
    t0 = time.time()
    train_codes = encode_features(tok, data["feats"], features)
    test_codes = encode_features(tok, test_feats, features)
    qas = data["qas"]
    del data, test_feats
    t_encode = time.time() - t0
    train_counts = [len(c) for c in train_codes]
    print(
        f"encoded {len(train_codes)} training images: {count_stats(train_counts)['mean']:.1f} ids each",
        flush=True,
    )

    # (2) the LM reads the ids as words
    lm, text_tok = load_text_lm(NAME)
    n_words = len(text_tok)
    layout, rows = extend_lm(lm, text_tok, tok, residual=args.residual)
    builder = ts.SequenceBuilder(text_tok)
    trainable = list(lm.parameters())  # the image rows are a submodule of its embedding now
    opt = make_optimizer(lm, args.lr, args.weight_decay, args.lm_lr)
    n_params = sum(q.numel() for q in trainable)
    print(f"vocab {n_words} -> {layout.vocab_size}; trainable parameters: {n_params / 1e6:.2f} M", flush=True)

    # (3) train
    rng = np.random.default_rng(args.seed + 1)
    lm.train()
    t_train0, cpu0 = time.time(), time.process_time()
    log, ema, steps_done, seq_lens = [], {}, 0, []
    bar = tqdm(range(args.steps), desc=f"train shapes-{kind}-lm", mininterval=10)
    for step in bar:
        idx = rng.choice(len(train_codes), size=min(args.batch, len(train_codes)), replace=False)
        seqs = []
        for j in idx:
            pool = qas[int(j)]
            order = rng.permutation(len(pool))[: args.qas_per_seq]
            seqs.append(build_sequence(builder, layout, train_codes[int(j)], [pool[k] for k in order]))
        seq_lens += [len(s[0]) for s in seqs]
        lr = ts._lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss, correct, total, w_correct, w_total = step_loss(lm, text_tok, seqs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        steps_done = step + 1
        now = {
            "loss": loss.item(),
            "answer_token_acc": correct / max(total, 1),
            "answer_word_acc": w_correct / max(w_total, 1),
        }
        for k, v in now.items():
            ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
        bar.set_postfix(loss=f"{ema['loss']:.3f}", word_acc=f"{ema['answer_word_acc']:.3f}", lr=f"{lr:.1e}")
        if step % 50 == 0 or step == args.steps - 1:
            log.append(
                {
                    "step": step,
                    **{k: round(v, 4) for k, v in ema.items()},
                    "lr": lr,
                    "elapsed_s": round(time.time() - t_train0, 1),
                    "cpu_s": round(time.process_time() - cpu0, 1),
                }
            )
            print(json.dumps(log[-1]), flush=True)
        if args.time_budget_min and time.time() - t_start > 60 * args.time_budget_min:
            print(f"time budget reached after {steps_done} steps", flush=True)
            break
    t_train, cpu_train = time.time() - t_train0, time.process_time() - cpu0
    fold_image_rows(lm)
    lm.eval()

    # (4) save, evaluate
    out_dir.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out_dir)
    text_tok.save_pretrained(out_dir)
    (out_dir / "image_vocab.json").write_text(
        json.dumps({"layout": layout.to_dict(), "tokenizer_dir": str(args.tokenizer_dir)}, indent=2) + "\n"
    )
    t0 = time.time()
    result = evaluate(lm, text_tok, builder, layout, test_codes, samples)
    t_eval = time.time() - t0
    test_counts = [len(c) for c in test_codes]
    base = continuous_baseline(RESULTS_DIR / f"train_{NAME}.json")
    name = f"shapes-{kind}-lm"
    comparison = {
        "continuous": base,
        "delta_accuracy": None,
        "line": f"{name}: continuous baseline report missing",
    }
    if base is not None:
        comparison["delta_accuracy"] = round(result["overall"] - base["test_accuracy"], 4)
        comparison["line"] = (
            f"{name} {result['overall']:.3f} with {np.mean(test_counts):.1f} ids/image vs continuous "
            f"{base['model']} {base['test_accuracy']:.3f} with {base['visual_tokens_per_image']} "
            "tokens/image "
            f"({comparison['delta_accuracy']:+.3f}; eval n={args.eval_n} here, "
            f"{(base['eval'] or {}).get('n')} there)"
        )
    report = {
        "model": name,
        "test_accuracy": result["overall"],
        "test_accuracy_per_family": result["per_family"],
        "test_n_per_family": result["n_per_family"],
        "comparison": comparison,
        "eval": {
            "split": "test",
            "n": args.eval_n,
            "seed": args.seed,
            "path": "LlamaForCausalLM.generate(), greedy, max_new_tokens=4, left padding",
            "image_size": 336,
        },
        "tokens_per_image": {
            "fixed": isinstance(tok, SeedTokenizer),
            "test": count_stats(test_counts),
            "train": count_stats(train_counts),
            "note": "code ids only; the LM also reads <boi> and <eoi> (+2)",
        },
        "codebook_usage": {
            "test": codebook_usage(torch.cat(test_codes), tok.config.codebook_size),
            "train": codebook_usage(torch.cat(train_codes), tok.config.codebook_size),
        },
        "tokenizer": {
            "dir": str(args.tokenizer_dir),
            "kind": kind,
            "pool": features["pool"],
            "config": tok.config.to_dict(),
        },
        "vocab": {"words": n_words, **layout.to_dict()},
        "language_model": {
            "init": f"shipped {NAME} language model and word tokenizer",
            "image_rows": "linear map of the tokenizer's decode_embeddings (columns standardised)"
            + (" + free per-code residual" if args.residual else ""),
            "trained": "all LM parameters (at --lm-lr) + image rows (at --lr)",
            "hidden": lm.config.hidden_size,
            "layers": lm.config.num_hidden_layers,
            "heads": lm.config.num_attention_heads,
            "intermediate": lm.config.intermediate_size,
        },
        "sequence_tokens_mean": round(float(np.mean(seq_lens)), 1) if seq_lens else None,
        "hyper_parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps_done": steps_done,
        "trainable_parameters": n_params,
        "wall_time_s": {
            "features": round(t_features, 1),
            "encode": round(t_encode, 1),
            "train": round(t_train, 1),
            "eval": round(t_eval, 1),
            "total": round(time.time() - t_start, 1),
        },
        "cpu_s_per_step": round(cpu_train / max(steps_done, 1), 3),
        **ts.run_environment(args.threads),
        "train_log": log,
        "examples": [
            {"q": s.question, "a": s.answer, "pred": pr, "family": s.family, "ids": len(c)}
            for s, pr, c in list(zip(samples, result["predictions"], test_codes))[:20]
        ],
    }
    print(comparison["line"], flush=True)
    return ts.write_report(report, results_path)


if __name__ == "__main__":
    main()
