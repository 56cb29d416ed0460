"""Train an embedded ShapesVQA model (language model + projector; the DINOv2 tower stays frozen).

    python -m mmcompress.evals.train_shapes --model shapes-llava
    python -m mmcompress.evals.train_shapes --model shapes-llava-next --init-from shapes-llava

Steps: (1) build the untrained transformers model around the frozen tower; (2) run the tower once per
training image and keep its features (``vision_feature_layer=[4, -1]``, CLS dropped, fp16 in RAM); (3)
train on sequences holding one image and several QA pairs about it (the first QA in exactly the
inference format), loss on the answer words and ``</s>`` only; (4) ship the trained weights to
``mmcompress/zoo/weights/<name>/``; (5) assemble the full checkpoint like a user would and evaluate it
per question family through ``generate()`` (greedy) on the test split; (6) write
``evals/results/train_<name>.json``. Fixed seeds; sized to finish in under an hour on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
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
    from evals.shapes_patch_labels import (  # type: ignore[no-redef]
        LABEL_CLASSES,
        READOUT_KEYS,
        absent_mention_position,
        is_relation,
        mention_positions,
        object_label,
        object_patches,
        patch_labels,
        question_tokens,
        referenced_groups,
        relation_targets,
        relation_word_position,
    )
    from evals.shapesvqa import FAMILIES, ShapesVQA, score  # type: ignore[no-redef]
else:
    from .shapes_patch_labels import (
        LABEL_CLASSES,
        READOUT_KEYS,
        absent_mention_position,
        is_relation,
        mention_positions,
        object_label,
        object_patches,
        patch_labels,
        question_tokens,
        referenced_groups,
        relation_targets,
        relation_word_position,
    )
    from .shapesvqa import FAMILIES, ShapesVQA, score

from mmcompress.zoo import build as zoo_build
from mmcompress.zoo.dinov2 import dinov2_tower
from mmcompress.zoo.paths import shipped_weights_dir
from mmcompress.zoo.specs import SPECS, make_config, make_processor
from mmcompress.zoo.text import answer_from_text, build_prompt, build_tokenizer

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# LLaVA-NeXT trains and is evaluated on both landscape and portrait images (different AnyRes grids).
NEXT_IMAGE_SIZES = ((448, 224), (224, 448))


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _image_size_for(name: str, index: int):
    spec = SPECS[name]
    if spec.arch == "llava":
        return spec.image_size
    return NEXT_IMAGE_SIZES[index % len(NEXT_IMAGE_SIZES)]


def _datasets(name: str, split: str, n: int, seed: int) -> list[tuple[ShapesVQA, int]]:
    """(dataset, index) pairs; NeXT alternates landscape / portrait datasets that share the index stream."""
    if SPECS[name].arch == "llava":
        ds = ShapesVQA(split, n=n, seed=seed, image_size=SPECS[name].image_size)
        return [(ds, i) for i in range(n)]
    sets = [ShapesVQA(split, n=n, seed=seed, image_size=s) for s in NEXT_IMAGE_SIZES]
    return [(sets[i % len(sets)], i) for i in range(n)]


@torch.no_grad()
def tower_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Frozen-tower features exactly as LLaVA selects them.

    pixel_values: (V, 3, S, S) views -> (V, P, 768): hidden_states[4] ⊕ hidden_states[-1], CLS dropped.
    """
    cfg = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    feats = torch.cat([out.hidden_states[i] for i in cfg.vision_feature_layer], dim=-1)
    return feats[:, 1:]


def qa_pool(ds: ShapesVQA, index: int, n_qas: int) -> list[tuple[str, str, str]]:
    """The item's own QA first, then ``n_qas - 1`` family-balanced extra QAs about the same scene."""
    sample, extra = ds.with_extra_questions(index, n_qas - 1)
    return [(sample.question, sample.answer, sample.family), *extra]


def precompute(model, processor, name: str, n_images: int, n_qas: int, seed: int, cache: Path | None):
    """Tower features and QA pools of the training images (cached on disk if ``cache`` is given).

    Returns feats (N, V, P, 768) fp16, image_sizes (N, 2) as (height, width), and per image a list of
    (question, answer, family).
    """
    key = f"{name}-n{n_images}-s{seed}.pt"  # features do not depend on the QA pools
    pairs = _datasets(name, "train", n_images, seed)
    # the QA pools are cheap and not cached, so a generator change never needs the tower again
    qas = [qa_pool(ds, i, n_qas) for ds, i in tqdm(pairs, desc="QA pools", mininterval=10)]
    if cache is not None and (cache / key).exists():
        print(f"loading cached features {cache / key}", flush=True)
        data = torch.load(cache / key)
        data["qas"] = qas
        return data
    # Items are pure functions of their index, so a cache of fewer images is an exact prefix: reuse it.
    feats, sizes, done = None, [], 0
    if cache is not None:
        smaller = []
        for f in cache.glob(f"{name}-n*-s{seed}.pt"):
            m = re.fullmatch(rf"{re.escape(name)}-n(\d+)-s{seed}\.pt", f.name)
            if m and int(m.group(1)) < n_images:
                smaller.append((int(m.group(1)), f))
        if smaller:
            done, f = max(smaller)
            print(f"reusing {done} cached images from {f}", flush=True)
            prev = torch.load(f)
            feats = torch.empty((n_images, *prev["feats"].shape[1:]), dtype=torch.float16)
            feats[:done] = prev["feats"]
            sizes = [tuple(hw) for hw in prev["image_sizes"].tolist()]
            del prev
    chunk = 8  # the tower is ~2x faster per image in batches of 8 than one by one
    for start in tqdm(range(done, n_images, chunk), desc="tower features", mininterval=10):
        samples = []
        for ds, i in pairs[start : start + chunk]:
            sample = ds[i]
            sizes.append(sample.image.size[::-1])
            samples.append(sample)
        # one image size per call, so every item has the same number of views
        by_size: dict[tuple, list[int]] = {}
        for k, s in enumerate(samples):
            by_size.setdefault(s.image.size, []).append(k)
        for ks in by_size.values():
            pv = processor.image_processor([samples[k].image for k in ks], return_tensors="pt")[
                "pixel_values"
            ]
            n_views = pv.shape[1] if pv.dim() == 5 else 1
            pv = pv.flatten(0, 1) if pv.dim() == 5 else pv  # NeXT: (b, V, 3, S, S) -> (b*V, 3, S, S)
            f = tower_features(model, pv).to(torch.float16)
            f = f.reshape(len(ks), n_views, *f.shape[1:])
            if feats is None:
                feats = torch.empty((n_images, *f.shape[1:]), dtype=torch.float16)
            if f.shape[1:] != feats.shape[1:]:
                raise RuntimeError(
                    f"feature shape {tuple(f.shape[1:])} differs from {tuple(feats.shape[1:])}; "
                    "training needs one AnyRes grid size (views) per image size"
                )
            for k, fk in zip(ks, f):
                feats[start + k] = fk
    data = {"feats": feats, "image_sizes": torch.tensor(sizes)}
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / (key + ".tmp")
        torch.save(data, tmp)
        tmp.replace(cache / key)  # atomic: an interrupted run never leaves a truncated cache
    data["qas"] = qas
    return data


class SequenceBuilder:
    """Token ids and loss targets for one training sequence.

    Layout: ``<s> <image>*T question: q1 answer: a1 </s> question: q2 answer: a2 </s> ...``; the prefix up
    to the first "answer:" is token-for-token what the processor makes of ``build_prompt(q1)``.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self.cache[text]

    def build(self, n_image_tokens: int, qas: list[tuple[str, str, str]]) -> tuple[list[int], ...]:
        """ids (L,), targets (L,), segments (L,) and positions (L,) of one packed sequence.

        target = next token at answer positions, -100 elsewhere. Segment 0 is ``<s>`` + image, segment k the
        k-th QA. Every QA gets the positions it would have as the only QA, and (through the mask built in
        :func:`train_step_loss`) sees only the image and itself: each QA is an exact inference-format
        sample, and no answer can be copied from an earlier QA about the same scene.
        """
        tok = self.tok
        ids = [tok.bos_token_id] + [tok.image_token_id] * n_image_tokens
        targets = [-100] * len(ids)
        segments = [0] * len(ids)
        positions = list(range(len(ids)))
        for k, (q, a, _fam) in enumerate(qas, start=1):
            prompt = self.ids(f"question: {q} answer:")
            ans = self.ids(a) + [tok.eos_token_id]
            seg_ids = prompt + ans
            seg_tgt = [-100] * (len(prompt) - 1) + ans + [-100]  # "answer:" predicts the word, the word </s>
            ids += seg_ids
            targets += seg_tgt
            segments += [k] * len(seg_ids)
            positions += list(range(1 + n_image_tokens, 1 + n_image_tokens + len(seg_ids)))
        return ids, targets, segments, positions


def visual_embeds(model, name: str, feats: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """Projected visual tokens of a batch, in the order the model places them.

    feats (B, V, P, 768) -> (B, T, H); for NeXT via the model's own ``pack_image_features`` (base view +
    unpadded crop grid + ``image_newline`` per row), so training sees exactly the inference layout.
    """
    B, V, P, D = feats.shape
    proj = model.model.multi_modal_projector(feats.reshape(B * V, P, D).float())  # (B*V, P, H)
    if SPECS[name].arch == "llava":
        return proj.reshape(B, -1, proj.shape[-1])  # a packing projector may emit fewer tokens
    per_image = list(proj.reshape(B, V, P, -1))
    packed, _lens = model.model.pack_image_features(
        per_image,
        image_sizes,
        vision_feature_select_strategy="default",
        image_newline=model.model.image_newline,
    )
    return torch.stack(packed.split(_lens.tolist()) if not isinstance(packed, list) else packed)


def feature_stats(feats: torch.Tensor, max_images: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (768,) of cached features.

    DINOv2 layer 4 has std ~0.05 and layer 12 ~2.3: without standardising, the colour half of the input
    is ~50x too small for the projector, and under Adam its weights learn ~50x too slowly.
    """
    x = feats[:max_images].reshape(-1, feats.shape[-1]).float()
    return x.mean(0), x.std(0).clamp_min(1e-3)


@torch.no_grad()
def fold_standardisation(linear: torch.nn.Linear, mu: torch.Tensor, sd: torch.Tensor) -> None:
    """Make ``linear`` act on raw features: W' = W / sd, b' = b - W' mu (exact; what the checkpoint ships)."""
    linear.weight.div_(sd)
    linear.bias.sub_(linear.weight @ mu)


@torch.no_grad()
def unfold_standardisation(linear: torch.nn.Linear, mu: torch.Tensor, sd: torch.Tensor) -> None:
    """Inverse of :func:`fold_standardisation` (to fine-tune a shipped projector on standardised features)."""
    linear.bias.add_(linear.weight @ mu)
    linear.weight.mul_(sd)


def block_mask(seg: torch.Tensor) -> torch.Tensor:
    """seg ``(B, L)`` segment ids (0 = ``<s>`` + image, k = k-th QA, -1 = right padding) -> ``(B, L, L)``
    boolean mask, True = may attend: causal, and a QA sees the image segment and itself only; padding
    rows attend to themselves (so no row is empty)."""
    L = seg.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    same = seg[:, :, None] == seg[:, None, :]
    to_image = (seg[:, None, :] == 0) & (seg[:, :, None] >= 0)
    return ((same | to_image) & causal) | torch.eye(L, dtype=torch.bool)


def train_step_loss(
    model, name, batch_feats, batch_sizes, seqs, image_token_id, pad_id, eos_id, word_hits=None
):
    """Cross-entropy on answer positions.

    Returns (loss, n_correct, n_targets, n_correct_words, n_words); "words" leaves out the ``</s>`` targets.
    ``word_hits``, a list if given, is extended with ``(sequence, segment, correct)`` per answer-word
    target (segment k = the k-th QA), for per-family training accuracy.
    """
    vis = visual_embeds(model, name, batch_feats, batch_sizes)  # (B, T, H)
    B, L = len(seqs), max(len(s[0]) for s in seqs)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    tgt = torch.full((B, L), -100, dtype=torch.long)
    seg = torch.full((B, L), -1, dtype=torch.long)  # -1: right padding
    pos = torch.zeros((B, L), dtype=torch.long)
    for b, (s_ids, s_tgt, s_seg, s_pos) in enumerate(seqs):
        n = len(s_ids)
        ids[b, :n], tgt[b, :n] = torch.tensor(s_ids), torch.tensor(s_tgt)
        seg[b, :n], pos[b, :n] = torch.tensor(s_seg), torch.tensor(s_pos)
    mask = block_mask(seg)
    emb = model.model.language_model.get_input_embeddings()(ids)
    img_mask = (ids == image_token_id).unsqueeze(-1).expand_as(emb)
    emb = emb.masked_scatter(img_mask, vis.to(emb.dtype))
    hidden = model.model.language_model(
        inputs_embeds=emb, attention_mask=mask[:, None], position_ids=pos
    ).last_hidden_state
    sel = tgt != -100
    logits = model.lm_head(hidden[sel])  # only where there is a target: (K, vocab)
    y = tgt[sel]
    loss = F.cross_entropy(logits, y)
    hit = logits.argmax(-1) == y
    words = y != eos_id
    if word_hits is not None:
        b_idx = sel.nonzero()[:, 0]
        word_hits += zip(b_idx[words].tolist(), seg[sel][words].tolist(), hit[words].tolist(), strict=True)
    return loss, int(hit.sum()), int(y.numel()), int(hit[words].sum()), int(words.sum())


class RetrievalTap:
    """Supervises where a few heads of one LM attention layer look (the retrieval loss, training only).

    A forward pre-hook keeps the layer's input (``hidden_states``, RoPE ``position_embeddings``); after the
    forward, :meth:`loss` recomputes, for the first ``heads`` heads and only the "answer:" query rows, the
    pre-softmax scores against the image tokens, and returns ``-log`` of the softmax mass (over the image
    tokens) that falls on the patches of the objects the question is about. Why: at initialisation every
    head spreads its attention over all 576 image tokens, so the answer loss alone barely tells a head
    *which* handful of patches held the answer and a from-scratch LM stays at its text prior for thousands
    of steps; this tells it directly. On request it also hands back what each supervised head retrieved,
    for the readout loss: measured on the first shipped model, the heads put ~60 % of their mass on the
    right object (the rest on other objects, none on the background), yet 40 % of its "what color"
    answers named a colour absent from the scene. SDPA stays on for the forward itself.
    """

    def __init__(self, attn: torch.nn.Module, heads: int) -> None:
        self.attn, self.heads, self.seen = attn, heads, {}
        self._h = attn.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, mod, args, kwargs) -> None:
        self.seen = {"hs": kwargs["hidden_states"], "pe": kwargs["position_embeddings"]}

    def remove(self) -> None:
        self._h.remove()

    def loss(
        self, rows: torch.Tensor, allowed: torch.Tensor, target: torch.Tensor, retrieved: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """rows: ``[R, 2]`` (sequence, position) of answer rows; allowed: ``[R, L]`` the keys each row may
        attend to (its mask row); target: ``[R, heads, L]`` per supervised head, the image tokens it
        should look at (the objects the question is about; for a relation, alternately the first and the
        second object).

        ``-log`` of the attention mass on the target under the row's real softmax (over every allowed key,
        text and ``<s>`` included — a head cannot satisfy it by keeping a sharp but tiny share on the
        image while its output comes from the text), averaged over rows and the first ``heads`` heads;
        and, if ``retrieved``, ``[R, heads, head_dim]``, each supervised head's attention output at each
        row (before ``o_proj``), which the readout loss asks to carry the looked-at object's attributes
        (else None).
        """
        from transformers.models.llama.modeling_llama import rotate_half

        hs, (cos, sin) = self.seen["hs"], self.seen["pe"]
        a, hd, nh = self.attn, self.attn.head_dim, self.heads
        b, p = rows[:, 0], rows[:, 1]
        q = _head_proj(a.q_proj, hs[b, p], nh, hd)  # [R, nh, hd]
        k = _head_proj(a.k_proj, hs, nh, hd)  # [B, L, nh, hd]
        q = q * cos[b, p, None].float() + rotate_half(q) * sin[b, p, None].float()
        k = k * cos[:, :, None].float() + rotate_half(k) * sin[:, :, None].float()
        scores = _per_sequence(b, lambda sel, s: torch.einsum("rhd,lhd->rhl", q[sel], k[s])) * a.scaling
        logp = torch.log_softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)  # [R, nh, L]
        hit = torch.logsumexp(logp.masked_fill(~target, float("-inf")), dim=-1)  # [R, nh]
        if not retrieved:
            return -hit.mean(), None
        # what each supervised head hands on (its attention output before o_proj), for the readout loss
        v = _head_proj(a.v_proj, hs, nh, hd)  # [B, L, nh, hd]
        probs = logp.exp()
        return -hit.mean(), _per_sequence(b, lambda sel, s: torch.einsum("rhl,lhd->rhd", probs[sel], v[s]))


def _head_proj(linear: torch.nn.Linear, x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """The first ``heads`` heads of a q/k/v projection of ``x [..., hidden]``: ``[..., heads, head_dim]``
    in fp32 (only those output rows are computed)."""
    n = heads * head_dim
    bias = None if linear.bias is None else linear.bias[:n]
    return F.linear(x, linear.weight[:n], bias).float().unflatten(-1, (heads, head_dim))


def _per_sequence(seq_of_row: torch.Tensor, fn) -> torch.Tensor:
    """``fn(rows_of_s, s)`` for each sequence ``s`` present, stitched back into row order.

    Why: gathering each row's own keys (``k[seq_of_row]``, ``[R, L, heads, head_dim]``) copies the whole
    sequence once per row — hundreds of MB per step with the mention and pointer rows — where one einsum
    per sequence reads it once.
    """
    out = None
    for s in seq_of_row.unique().tolist():
        sel = (seq_of_row == s).nonzero().flatten()
        part = fn(sel, s)
        if out is None:
            out = part.new_zeros((len(seq_of_row), *part.shape[1:]))
        out = out.index_copy(0, sel, part)
    if out is None:
        raise ValueError("_per_sequence: no rows; allowed: at least one row")
    return out


def retrieval_masks(seqs, rows: list[tuple[int, int]], groups: list[list[torch.Tensor]], heads: int):
    """``(rows [R, 2], allowed [R, L], target [R, heads, L])`` for :meth:`RetrievalTap.loss`.

    ``allowed`` is the row of the training mask (the image segment and the row's own QA up to itself, as
    in :func:`train_step_loss`); ``groups[r]`` holds one or more sequence-index tensors (see
    ``shapes_patch_labels.referenced_groups``), and head ``h`` is supervised towards group
    ``h % len(groups[r])``.
    """
    L = max(len(s[0]) for s in seqs)
    allowed = torch.zeros(len(rows), L, dtype=torch.bool)
    target = torch.zeros(len(rows), heads, L, dtype=torch.bool)
    for r, ((b, p), g) in enumerate(zip(rows, groups, strict=True)):
        seg = torch.tensor(seqs[b][2])
        allowed[r, : len(seg)] = (seg == 0) | (seg == seg[p])
        allowed[r, p + 1 :] = False
        for h in range(heads):
            target[r, h, g[h % len(g)]] = True
    return torch.tensor(rows), allowed, target


def retrieval_rows(
    seqs,
    seq_qas,
    scenes,
    obj_patches,
    heads,
    grid,
    patch,
    tokenizer=None,
    split_relations=True,
    null_rows=False,
):
    """Rows, per-head targets and per-head readout labels for one batch of the retrieval / readout losses.

    Every QA about something contributes its "answer:" row (with ``split_relations``, a relation's two
    objects on alternate heads; without, every head towards both, as v1 of shapes-llava was trained);
    with ``tokenizer`` given, also the row of each word that names an object
    (``shapes_patch_labels.mention_positions``), all heads towards that one object. Returns ``rows``
    ``[(sequence, position)]``, ``groups`` (per row, one or more ``[n]`` tensors of sequence positions)
    and ``labels`` (per row, per head, :func:`~shapes_patch_labels.object_label` of the head's object, or
    ``-100`` everywhere when the head looks at several objects, as for counting). With ``null_rows``, an
    existence question about an absent object (:func:`~shapes_patch_labels.absent_mention_position`)
    contributes its "answer:" row and (with ``tokenizer``) its shape word's row, every head towards the
    ``<s>`` sink at sequence position 0 (readout labels ``-100``).
    """
    rows, groups_out, labels = [], [], []
    sink = [torch.tensor([0])]
    no_labels = dict.fromkeys(READOUT_KEYS, -100)

    def add(row, groups):
        rows.append(row)
        groups_out.append([1 + torch.cat([obj_patches[row[0]][r] for r in g]) for g in groups])  # after <s>
        labels.append(
            [
                object_label(scenes[row[0]][g[0]], grid, patch)
                if len(g) == 1
                else dict.fromkeys(READOUT_KEYS, -100)
                for g in (groups[h % len(groups)] for h in range(heads))
            ]
        )

    for b, pos, question in answer_rows_with_questions(seqs, seq_qas):
        words = question_tokens(question)
        first = pos - len(words) - 1  # the QA reads "question : <words> answer :", pos is the last ":"

        groups = referenced_groups(scenes[b], question)
        if not groups:  # "is there a ...?" -> no: nothing to look at but the sink (with null_rows)
            w = absent_mention_position(scenes[b], question) if null_rows else None
            if w is None:
                continue
            null = [(b, pos)]
            if tokenizer is not None:
                _check_word(tokenizer, seqs[b][0], first, words, w, question)
                null.append((b, first + w))
            for row in null:
                rows.append(row)
                groups_out.append(sink)
                labels.append([no_labels] * heads)
            continue
        add((b, pos), groups if split_relations else [[r for g in groups for r in g]])
        if tokenizer is not None:
            for g, w in zip(groups, mention_positions(scenes[b], question), strict=True):
                _check_word(tokenizer, seqs[b][0], first, words, w, question)
                add((b, first + w), [g])
    return rows, groups_out, labels


def _check_word(tokenizer, ids, first: int, words: list[str], w: int, question: str) -> None:
    """Raise if sequence position ``first + w`` does not hold word ``w`` of ``question`` (a layout bug)."""
    got = tokenizer.convert_ids_to_tokens(ids[first + w])
    if got != words[w]:
        raise RuntimeError(f"mention row of {question!r}: token {got!r}, expected {words[w]!r}")


def pointer_rows(
    seqs, seq_qas, scenes, all_families: bool = False
) -> tuple[list[tuple[int, int]], list[list[torch.Tensor]]]:
    """Rows and targets of the pointer loss: each relation's "answer:" row, its heads in turn towards the
    word naming the subject (A), the word naming the reference (B) (``shapes_patch_labels.
    mention_positions``) and the relation word; groups as :func:`retrieval_masks` takes them (with two
    heads only A and B are pointed at).

    Why: measured on the 72.0 % model, the retrieval heads at a relation's "answer:" row put the same
    mass on A and B in every head (mean 0.36 / 0.31), so nothing downstream can tell which object is
    left of which. The mention rows, on the other hand, are trained to look up one object each, so a
    later layer that copies from those two words gets A's and B's attributes apart.

    With ``all_families``, every other QA's "answer:" row too, all heads towards the word that names its
    object (or, for an absent "is there a <colour> <shape>?", the shape word). Why: measured on the
    80.9 % model, for "what shape is the <colour> object?" the colour word's own row puts 0.92 of its
    retrieval mass on the object and the "answer:" row only 0.40 (shape accuracy 0.61), while for "what
    color is the <shape>?" both rows look well (0.97 / 0.89; accuracy 1.00). Copying from the word moves
    the lookup that works to where the answer is read.
    """
    rows, groups = [], []
    for b, pos, question in answer_rows_with_questions(seqs, seq_qas):
        first = pos - len(question_tokens(question)) - 1  # "question : <words> answer :", pos = last ":"
        if is_relation(scenes[b], question):
            words = [*mention_positions(scenes[b], question), relation_word_position(question)]
        elif all_families:
            absent = absent_mention_position(scenes[b], question)
            words = [absent] if absent is not None else mention_positions(scenes[b], question)[:1]
        else:
            continue
        rows.append((b, pos))
        groups.append([torch.tensor([first + w]) for w in words])
    return rows, groups


class LayerOutputTap:
    """Keeps the output hidden states ``[B, L, hidden]`` of one LM decoder layer (training only), for the
    relation auxiliary loss (:func:`relation_rows`)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.out: torch.Tensor | None = None
        self._h = layer.register_forward_hook(self._keep)

    def _keep(self, mod, args, out) -> None:
        self.out = out[0] if isinstance(out, tuple) else out

    def remove(self) -> None:
        self._h.remove()


def relation_rows(seqs, seq_qas, scenes, side: float) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The "answer:" rows of the relation QAs in a batch and their targets ``[R, 3]``
    (:func:`~shapes_patch_labels.relation_targets`: A left of B, A above B, with -100 = not asked, too
    close; the relation word 0..3)."""
    rows, targets = [], []
    for b, pos, question in answer_rows_with_questions(seqs, seq_qas):
        t = relation_targets(scenes[b], question, side)
        if t is not None:
            rows.append((b, pos))
            targets.append(t)
    return rows, torch.tensor(targets, dtype=torch.long).reshape(-1, 3)


def answer_rows_with_questions(seqs, seq_qas) -> list[tuple[int, int, str]]:
    """``(sequence, position, question)`` of every "answer:" row, in QA order: :func:`answer_rows` paired
    with the QAs each sequence was built from."""
    qa_of_row = [(b, k) for b, q in enumerate(seq_qas) for k in range(len(q))]
    out = []
    for (b, pos), (bb, k) in zip(answer_rows(seqs), qa_of_row, strict=True):
        if b != bb:
            raise RuntimeError(f"answer row {pos} of sequence {b} pairs with a QA of sequence {bb}")
        out.append((b, pos, seq_qas[b][k][0]))
    return out


def answer_rows(seqs: list[tuple[list[int], ...]]) -> list[tuple[int, int]]:
    """(sequence, position) of every "answer:" token in QA order: the first target of each QA segment."""
    rows = []
    for b, (_ids, tgt, _seg, _pos) in enumerate(seqs):
        rows += [(b, i) for i in range(1, len(tgt)) if tgt[i] != -100 and tgt[i - 1] == -100]
    return rows


@torch.no_grad()
def evaluate(model, processor, name: str, n: int, seed: int, batch_size: int = 8) -> dict:
    """Greedy ``generate()`` on ``n`` test samples; accuracy overall and per family."""
    model.eval()
    tok = processor.tokenizer
    pairs = _datasets(name, "test", n, seed)
    hits: dict[str, list[float]] = {f: [] for f in FAMILIES}
    examples = []
    # Group by image size so each batch has one AnyRes grid (NeXT) and the batch stays rectangular.
    groups: dict[tuple, list] = {}
    for ds, i in pairs:
        groups.setdefault((ds.width, ds.height), []).append((ds, i))
    todo = [g[k : k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]
    for chunk in tqdm(todo, desc=f"eval {name}", mininterval=10):
        samples = [ds[i] for ds, i in chunk]
        inputs = processor(
            images=[s.image for s in samples],
            text=[build_prompt(s.question) for s in samples],
            return_tensors="pt",
            padding=True,
        )
        out = model.generate(
            **inputs,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        texts = tok.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
        for s, t in zip(samples, texts):
            pred = answer_from_text(t)
            hits[s.family].append(score(pred, s.answer))
            if len(examples) < 20:
                examples.append({"q": s.question, "a": s.answer, "pred": pred, "family": s.family})
    per_family = {f: round(float(np.mean(v)), 4) for f, v in hits.items() if v}
    overall = float(np.mean([x for v in hits.values() for x in v]))
    return {
        "overall": round(overall, 4),
        "per_family": per_family,
        "n_per_family": {f: len(v) for f, v in hits.items()},
        "examples": examples,
    }


def weights_rope_theta(folder: Path) -> float:
    """The RoPE base in a weights folder's ``config.json`` (an embedded model's shipped weights or a
    previous ``--out``): a model started from those weights must rotate its queries and keys the same way."""
    text = json.loads((Path(folder) / "config.json").read_text())["text_config"]
    return float(text.get("rope_parameters", {}).get("rope_theta", 10000.0))


def build_untrained(name: str, rope_theta: float = 10000.0):
    """``(model, processor, tokenizer)``: the pretrained frozen tower around a fresh LM and projector."""
    tok = build_tokenizer()
    processor = make_processor(name, tok)
    tower = dinov2_tower(SPECS[name].image_size)
    model = zoo_build.model_class(name)(make_config(name, tower.config, tok, rope_theta=rope_theta))
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.generation_config.update(
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        max_new_tokens=4,
        do_sample=False,
    )
    return model, processor, tok


def run_environment(threads: int) -> dict:
    """``machine`` and ``versions`` entries of a training report."""
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "threads": threads,
            "python": platform.python_version(),
        },
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }


def write_report(report: dict, path: Path) -> dict:
    """Write a training report (JSON, atomically) and print its headline numbers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    print(
        json.dumps(
            {k: report[k] for k in ("model", "test_accuracy", "test_accuracy_per_family", "wall_time_s")},
            indent=2,
        ),
        flush=True,
    )
    return report


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=sorted(SPECS))
    p.add_argument("--images", type=int, default=3000, help="training images (tower run once each)")
    p.add_argument("--qas", type=int, default=48, help="QA pool size per training image")
    p.add_argument(
        "--qas-per-seq", type=int, default=16, help="QA pairs packed after the image in one sequence"
    )
    p.add_argument("--steps", type=int, default=2600)
    p.add_argument("--batch", type=int, default=4, help="sequences (images) per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=560)
    p.add_argument(
        "--time-budget-min",
        type=float,
        default=0.0,
        help="stop training early (cosine schedule kept) once this many minutes have passed; 0 = off",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="start LM + projector from this embedded model's shipped weights, or from a weights folder "
        "(a previous --out) to go on training it",
    )
    p.add_argument(
        "--feature-cache", type=Path, default=None, help="folder to keep tower features between runs"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="weights folder (default: the package's zoo/weights/<name>)"
    )
    p.add_argument(
        "--results", type=Path, default=None, help="JSON path (default: evals/results/train_<name>.json)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--aux-weight",
        type=float,
        default=None,
        help="weight of the per-patch auxiliary heads (evals/shapes_patch_labels.py); "
        "default 1.0 for single-view models, 0 for AnyRes (no per-view labels)",
    )
    p.add_argument(
        "--attn-weight",
        type=float,
        default=None,
        help="weight of the retrieval loss on the attention of --attn-heads heads of LM layer --attn-layer "
        "(RetrievalTap); default: 1.0 where the per-patch labels exist (single view), else 0",
    )
    p.add_argument(
        "--readout-weight",
        type=float,
        default=0.0,
        help="weight of the readout loss: linear heads on each retrieval head's output must tell the "
        "looked-at object's colour, shape, size bin and grid cell; 0 = off (the default; `make train-llava` "
        "uses 1)",
    )
    p.add_argument(
        "--split-relations",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="a relation's 'answer:' row supervises its two objects on alternate retrieval heads instead "
        "of every head on both",
    )
    p.add_argument(
        "--mention-rows",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also supervise the retrieval heads at the question words that name objects "
        "(shapes_patch_labels.mention_positions), not only at the 'answer:' row",
    )
    p.add_argument(
        "--rope-theta",
        type=float,
        default=None,
        help="RoPE base of the language model (shipped in its config); default: the --init-from weights' "
        "base, else 10000",
    )
    p.add_argument(
        "--relation-weight",
        type=float,
        default=0.0,
        help="weight of the relation probe: linear heads on LM layer --relation-layer's output at a "
        "relation's 'answer:' row must tell whether A is left of / above B and the relation word (the "
        "answer is their XOR, which the answer loss alone does not find); 0 = off (the default; stage 2 "
        "of `make train-llava` uses 1)",
    )
    p.add_argument("--relation-layer", type=int, default=2)
    p.add_argument(
        "--pointer-weight",
        type=float,
        default=0.0,
        help="weight of the pointer loss: at a relation's 'answer:' row, the first --pointer-heads heads of "
        "LM layer --pointer-layer must attend to the word naming the subject, the reference and the "
        "relation word in turn (pointer_rows); 0 = off (the default; stage 2 of `make train-llava` uses 1)",
    )
    p.add_argument(
        "--pointer-all",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the pointer loss also covers every other question: its 'answer:' row points at the word "
        "naming its object (pointer_rows(all_families=True))",
    )
    p.add_argument(
        "--null-rows",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="an existence question about an absent object supervises its retrieval heads towards the "
        "<s> sink ('found nothing') instead of being skipped",
    )
    p.add_argument("--pointer-layer", type=int, default=2)
    p.add_argument("--pointer-heads", type=int, default=2)
    p.add_argument("--attn-layer", type=int, default=1)
    p.add_argument("--attn-heads", type=int, default=2)
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast for the LM and projector (the tower features stay fp32); ~2x faster on CPUs "
        "with AVX512-BF16 / AMX",
    )
    args = p.parse_args(argv)
    for field in ("images", "qas", "qas_per_seq", "steps", "batch", "eval_n"):
        if getattr(args, field) < 1:
            raise ValueError(f"--{field.replace('_', '-')}={getattr(args, field)} is invalid; allowed: >= 1")

    t_start = time.time()
    torch.set_num_threads(args.threads)
    _set_seed(args.seed)
    name, spec = args.model, SPECS[args.model]
    for field in ("aux_weight", "attn_weight", "readout_weight", "relation_weight", "pointer_weight"):
        if getattr(args, field) is None:
            setattr(args, field, 1.0 if spec.arch == "llava" else 0.0)
        if getattr(args, field) < 0 or (getattr(args, field) > 0 and spec.arch != "llava"):
            raise ValueError(
                f"--{field.replace('_', '-')}={getattr(args, field)} is invalid for {name}; "
                f"allowed: >= 0, and 0 for AnyRes models (no per-view labels)"
            )
    for flag, needs in (("null_rows", "attn_weight"), ("pointer_all", "pointer_weight")):
        if getattr(args, flag) and getattr(args, needs) == 0:
            raise ValueError(
                f"--{flag.replace('_', '-')} is invalid with --{needs.replace('_', '-')}=0; allowed: only "
                f"with --{needs.replace('_', '-')} > 0 (it adds rows to that loss)"
            )
    out_dir = args.out or shipped_weights_dir(name)
    results_path = args.results or RESULTS_DIR / f"train_{name}.json"

    src_dir = None
    if args.init_from:
        src_dir = Path(args.init_from)
        if not src_dir.is_dir():
            if args.init_from not in SPECS:
                raise ValueError(
                    f"--init-from={args.init_from!r} is invalid; allowed: a weights folder or one of "
                    f"{sorted(SPECS)}"
                )
            src_dir = shipped_weights_dir(args.init_from)
    if args.rope_theta is None:
        args.rope_theta = weights_rope_theta(src_dir) if src_dir is not None else 10000.0
    model, processor, tok = build_untrained(name, rope_theta=args.rope_theta)
    if src_dir is not None:
        from safetensors.torch import load_file

        src = src_dir / zoo_build.SHIPPED_WEIGHTS_FILE
        init = {k: v.float() for k, v in load_file(str(src)).items()}
        own = model.state_dict()
        usable = {k: v for k, v in init.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(usable, strict=False)
        print(f"initialised {len(usable)}/{len(init)} tensors from {src}", flush=True)
    model.model.vision_tower.requires_grad_(False)
    model.model.vision_tower.eval()

    t0 = time.time()
    data = precompute(model, processor, name, args.images, args.qas, args.seed, args.feature_cache)
    t_features = time.time() - t0
    feats, image_sizes, qas = data["feats"], data["image_sizes"], data["qas"]
    n_img_tokens = visual_embeds(model, name, feats[:1], image_sizes[:1]).shape[1]
    # Train the projector on standardised features; fold the standardisation back in before saving.
    mu, sd = feature_stats(feats)
    proj_in = model.model.multi_modal_projector.linear_1
    if args.init_from:
        unfold_standardisation(proj_in, mu, sd)
    print(
        f"features {tuple(feats.shape)} in {t_features:.0f} s; {n_img_tokens} visual tokens per image",
        flush=True,
    )

    # Check the sequence layout against the real processor once (the first QA must match inference).
    builder = SequenceBuilder(tok)
    q0 = qas[0][0]
    ds0, i0 = _datasets(name, "train", 1, args.seed)[0]
    ref = processor(images=ds0[i0].image, text=build_prompt(q0[0]), return_tensors="pt")["input_ids"][
        0
    ].tolist()
    mine = builder.build(n_img_tokens, [q0])[0]
    if mine[: len(ref)] != ref:
        raise RuntimeError("training sequence layout differs from the processor's prompt")

    heads, labels, scenes, tap = None, None, None, None
    if any(w > 0 for w in (args.aux_weight, args.attn_weight, args.relation_weight, args.pointer_weight)):
        grid = spec.image_size // model.config.vision_config.patch_size
        patch = model.config.vision_config.patch_size
        labels, scenes = patch_labels(
            ShapesVQA("train", n=args.images, seed=args.seed, image_size=spec.image_size),
            args.images,
            grid,
            patch,
        )
        obj_patches = [object_patches(labels, i, sc, grid, patch) for i, sc in enumerate(scenes)]
    if args.aux_weight > 0:
        heads = torch.nn.ModuleDict(
            {k: torch.nn.Linear(spec.hidden_size, c) for k, c in LABEL_CLASSES(grid).items()}
        )
    if args.attn_weight > 0:
        layers = model.model.language_model.layers
        if not 0 <= args.attn_layer < len(layers) or not 1 <= args.attn_heads <= spec.num_heads:
            raise ValueError(
                f"--attn-layer={args.attn_layer} / --attn-heads={args.attn_heads} are invalid; allowed: "
                f"0..{len(layers) - 1} and 1..{spec.num_heads}"
            )
        tap = RetrievalTap(layers[args.attn_layer].self_attn, args.attn_heads)
    readout = None
    if args.readout_weight > 0:
        if tap is None:
            raise ValueError(
                f"--readout-weight={args.readout_weight} is invalid with --attn-weight=0; allowed: 0 "
                "(the readout reads the retrieval heads)"
            )
        classes = LABEL_CLASSES(grid)
        readout = torch.nn.ModuleDict(
            {k: torch.nn.Linear(spec.hidden_size // spec.num_heads, classes[k]) for k in READOUT_KEYS}
        )

    rel_tap, rel_heads = None, None
    if args.relation_weight > 0:
        layers = model.model.language_model.layers
        if not 0 <= args.relation_layer < len(layers) or spec.arch != "llava":
            raise ValueError(
                f"--relation-layer={args.relation_layer} is invalid for {name}; "
                f"allowed: 0..{len(layers) - 1}, "
                "single-view models only"
            )
        rel_tap = LayerOutputTap(layers[args.relation_layer])
        # logits [left-of (2), above (2), word (4)]; the norm because a mid-stack residual is not normalised
        rel_heads = torch.nn.Sequential(
            torch.nn.LayerNorm(spec.hidden_size), torch.nn.Linear(spec.hidden_size, 8)
        )

    pointer_tap = None
    if args.pointer_weight > 0:
        layers = model.model.language_model.layers
        if (
            not 0 <= args.pointer_layer < len(layers)
            or not 1 <= args.pointer_heads <= spec.num_heads
            or spec.arch != "llava"
            or args.pointer_layer == args.attn_layer
        ):
            raise ValueError(
                f"--pointer-layer={args.pointer_layer} / --pointer-heads={args.pointer_heads} are invalid "
                f"for {name}; allowed: 0..{len(layers) - 1} other than --attn-layer={args.attn_layer}, "
                f"1..{spec.num_heads} heads, single-view models only"
            )
        pointer_tap = RetrievalTap(layers[args.pointer_layer].self_attn, args.pointer_heads)

    trainable = [p_ for n_, p_ in model.named_parameters() if not n_.startswith("model.vision_tower.")]
    for extra in (heads, readout, rel_heads):
        if extra is not None:
            trainable += list(extra.parameters())  # training-only, not shipped
    decay = [p_ for p_ in trainable if p_.dim() >= 2]
    no_decay = [p_ for p_ in trainable if p_.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    n_params = sum(p_.numel() for p_ in trainable)
    print(f"trainable parameters: {n_params / 1e6:.2f} M", flush=True)

    rng = np.random.default_rng(args.seed + 1)
    # NeXT: a batch must share one image size (one AnyRes grid), so batches are drawn per size group.
    groups: dict[tuple, np.ndarray] = {}
    for j, hw in enumerate(image_sizes.tolist()):
        groups.setdefault(tuple(hw), []).append(j)
    group_list = [np.array(v) for v in groups.values()]
    model.train()
    model.model.vision_tower.eval()
    t_train0 = time.time()
    log, ema_loss, ema_acc, ema_word, ema_aux, ema_attn, steps_done = [], None, None, None, None, None, 0
    ema_read, ema_rel, ema_point = None, None, None
    fam_hits: dict[str, list[bool]] = {}  # answer-word hits per family since the last log line
    bar = tqdm(range(args.steps), desc=f"train {name}", mininterval=10)
    for step in bar:
        group = group_list[int(rng.integers(len(group_list)))]
        idx = rng.choice(group, size=min(args.batch, len(group)), replace=False)
        seqs, seq_qas = [], []
        for j in idx:
            pool = qas[int(j)]
            order = rng.permutation(len(pool))[: args.qas_per_seq]
            seq_qas.append([pool[k] for k in order])
            seqs.append(builder.build(n_img_tokens, seq_qas[-1]))
        lr = _lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        batch_feats = (feats[idx].float() - mu) / sd
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            word_hits: list[tuple[int, int, bool]] = []
            loss, correct, total, w_correct, w_total = train_step_loss(
                model,
                name,
                batch_feats,
                image_sizes[idx],
                seqs,
                tok.image_token_id,
                tok.pad_token_id,
                tok.eos_token_id,
                word_hits=word_hits,
            )
            for b, k, h in word_hits:
                fam_hits.setdefault(seq_qas[b][k - 1][2], []).append(h)
            aux = torch.zeros(())
            if heads is not None:
                # the projector runs twice (here and inside train_step_loss): cheap next to the LM
                vis = model.model.multi_modal_projector(batch_feats.flatten(1, 2))
                aux = sum(
                    F.cross_entropy(h(vis).flatten(0, 1).float(), labels[k][idx].flatten())
                    for k, h in heads.items()
                ) / len(heads)
            attn, read = torch.zeros(()), torch.zeros(())
            if tap is not None:
                rows, targets, read_labels = retrieval_rows(
                    seqs,
                    seq_qas,
                    [scenes[int(j)] for j in idx],
                    [obj_patches[int(j)] for j in idx],
                    args.attn_heads,
                    grid,
                    patch,
                    tok if args.mention_rows else None,
                    args.split_relations,
                    args.null_rows,
                )
                attn, retrieved = tap.loss(
                    *retrieval_masks(seqs, rows, targets, args.attn_heads), retrieved=readout is not None
                )
                if readout is not None:
                    read = sum(
                        F.cross_entropy(
                            h(retrieved.flatten(0, 1)).float(),
                            torch.tensor([lab[k] for row in read_labels for lab in row]),
                            ignore_index=-100,
                        )
                        for k, h in readout.items()
                    ) / len(readout)
            point = torch.zeros(())
            if pointer_tap is not None:
                p_rows, p_groups = pointer_rows(
                    seqs, seq_qas, [scenes[int(j)] for j in idx], args.pointer_all
                )
                if p_rows:
                    point, _ = pointer_tap.loss(
                        *retrieval_masks(seqs, p_rows, p_groups, args.pointer_heads), retrieved=False
                    )
            rel = torch.zeros(())
            if rel_tap is not None:
                r_rows, r_tgt = relation_rows(seqs, seq_qas, [scenes[int(j)] for j in idx], spec.image_size)
                if r_rows:
                    r_idx = torch.tensor(r_rows)
                    logits = rel_heads(rel_tap.out[r_idx[:, 0], r_idx[:, 1]]).float()
                    rel = (
                        sum(
                            F.cross_entropy(logits[:, lo:hi], r_tgt[:, c], ignore_index=-100)
                            for c, (lo, hi) in enumerate(((0, 2), (2, 4), (4, 8)))
                            if (r_tgt[:, c] != -100).any()
                        )
                        / 3
                    )
        opt.zero_grad(set_to_none=True)
        (
            loss
            + args.aux_weight * aux
            + args.attn_weight * attn
            + args.readout_weight * read
            + args.relation_weight * rel
            + args.pointer_weight * point
        ).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        steps_done = step + 1
        acc = correct / max(total, 1)
        loss_v = loss.item()
        ema_loss = loss_v if ema_loss is None else 0.95 * ema_loss + 0.05 * loss_v
        ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
        w_acc = w_correct / max(w_total, 1)
        ema_word = w_acc if ema_word is None else 0.95 * ema_word + 0.05 * w_acc
        ema_aux = aux.item() if ema_aux is None else 0.95 * ema_aux + 0.05 * aux.item()
        ema_attn = attn.item() if ema_attn is None else 0.95 * ema_attn + 0.05 * attn.item()
        ema_read = read.item() if ema_read is None else 0.95 * ema_read + 0.05 * read.item()
        ema_rel = rel.item() if ema_rel is None else 0.95 * ema_rel + 0.05 * rel.item()
        ema_point = point.item() if ema_point is None else 0.95 * ema_point + 0.05 * point.item()
        bar.set_postfix(loss=f"{ema_loss:.3f}", word_acc=f"{ema_word:.3f}", lr=f"{lr:.1e}")
        if step % 50 == 0 or step == args.steps - 1:
            log.append(
                {
                    "step": step,
                    "loss": round(ema_loss, 4),
                    "answer_token_acc": round(ema_acc, 4),
                    "answer_word_acc": round(ema_word, 4),
                    "aux_loss": round(ema_aux, 4),
                    "attn_loss": round(ema_attn, 4),
                    "readout_loss": round(ema_read, 4),
                    "relation_loss": round(ema_rel, 4),
                    "pointer_loss": round(ema_point, 4),
                    "word_acc_per_family": {f: round(float(np.mean(v)), 3) for f, v in fam_hits.items()},
                    "lr": lr,
                    "elapsed_s": round(time.time() - t_train0, 1),
                }
            )
            print(json.dumps(log[-1]), flush=True)
            fam_hits = {}
        if args.time_budget_min and time.time() - t_start > 60 * args.time_budget_min:
            print(f"time budget reached after {steps_done} steps", flush=True)
            break
    t_train = time.time() - t_train0
    for t in (tap, rel_tap, pointer_tap):
        if t is not None:
            t.remove()
    del feats, data

    model.eval()
    fold_standardisation(proj_in, mu, sd)
    zoo_build.save_shipped_weights(model, processor, out_dir)
    print(f"saved trained weights to {out_dir}", flush=True)

    # Evaluate what users get: the shipped fp16 weights assembled into a full checkpoint and loaded back.
    t0 = time.time()
    if args.out is None:
        ckpt = zoo_build.checkpoint_dir(name, rebuild=True)
        eval_model = zoo_build.model_class(name).from_pretrained(ckpt, dtype=torch.float32).eval()
        from transformers import AutoProcessor

        eval_proc = AutoProcessor.from_pretrained(ckpt)
    else:  # a scratch folder: evaluate the in-memory model rounded to the shipped fp16
        eval_model, eval_proc = model.half().float(), processor
    result = evaluate(eval_model, eval_proc, name, args.eval_n, args.seed)
    t_eval = time.time() - t0

    report = {
        "model": name,
        "test_accuracy": result["overall"],
        "test_accuracy_per_family": result["per_family"],
        "test_n_per_family": result["n_per_family"],
        "eval": {
            "split": "test",
            "n": args.eval_n,
            "seed": args.seed,
            "path": "generate(), greedy, max_new_tokens=4",
            "image_size": [list(s) for s in NEXT_IMAGE_SIZES]
            if spec.arch == "llava_next"
            else spec.image_size,
        },
        "visual_tokens_per_image": int(n_img_tokens),
        "hyper_parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps_done": steps_done,
        "trainable_parameters": n_params,
        "language_model": {
            "hidden": spec.hidden_size,
            "layers": spec.num_layers,
            "heads": spec.num_heads,
            "intermediate": spec.intermediate_size,
            "vocab": len(tok),
        },
        "wall_time_s": {
            "features": round(t_features, 1),
            "train": round(t_train, 1),
            "eval": round(t_eval, 1),
            "total": round(time.time() - t_start, 1),
        },
        **run_environment(args.threads),
        "train_log": log,
        "examples": result["examples"],
    }
    return write_report(report, results_path)


if __name__ == "__main__":
    main()
