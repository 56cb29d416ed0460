"""Shared pieces of the discrete visual tokenizers: codebooks, id checks, usage statistics, LLM vocabulary.

Spec: ``specs/tokenpacker-seed-lavit.md`` §2.2 step 5 and §2.4 (SEED's Euclidean VQ, taming
``VectorQuantizer2`` with the legacy beta), §3.1 step 5 and §3.4 (LaVIT's L2-normalised codebook, EMA and
k-means tricks), §2.5 / §3.3 (how code ids become LLM vocabulary rows).

Vocabulary of this module:

* **id** (code id): an int in ``[0, K)``, the row of the codebook;
* **code**: the codebook vector ``[d]`` of an id (``d = 32`` in both official models);
* **LLM id**: ``id + offset`` in the extended LLM vocabulary, between a begin and an end image token
  (:class:`VocabLayout`).

``codes -> ids -> codes`` is exact: the nearest code of a codebook row is that row (for distinct rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_int

__all__ = [
    "LlmVocabMixin",
    "check_ids",
    "nearest_code",
    "VQOutput",
    "EuclideanCodebook",
    "CosineCodebook",
    "kmeans",
    "codebook_usage",
    "VocabLayout",
    "SEED_OFFICIAL_LAYOUT",
    "LAVIT_OFFICIAL_LAYOUT",
    "extend_vocab",
]


# -- ids ----------------------------------------------------------------------------------------------
def check_ids(ids: Any, num_codes: int, field: str = "ids") -> torch.Tensor:
    """Validate code ids: an integer tensor with every value in ``[0, num_codes)``; returns ``ids``.

    The error names the first bad value, its position and the allowed range, so an LLM id passed where a
    code id was expected (``id + offset``) is obvious.
    """
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{field} must be an integer torch.Tensor of code ids, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{field} must be an integer tensor of code ids, got dtype {ids.dtype}")
    if ids.numel():
        bad = (ids < 0) | (ids >= num_codes)
        if bool(bad.any()):
            pos = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{field} holds {int(ids[pos])} at position {pos}, outside the codebook; allowed: code ids "
                f"0..{num_codes - 1} (LLM ids must first be mapped back with VocabLayout.from_llm_ids)"
            )
    return ids


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Id of the nearest codebook row for each vector: ``[..., d], [K, d] -> [...]`` int64.

    Distances are ``|z|^2 + |e|^2 - 2 z.e`` and the first argmin wins ties, the expansion both official
    quantizers use (SEED §2.2 step 5, LaVIT §3.1 step 5), computed in at least fp32. Rows are processed in
    chunks of ``chunk`` so the ``[n, K]`` distance matrix stays small.
    """
    if z.shape[-1] != codebook.shape[-1] or codebook.dim() != 2:
        raise ValueError(
            f"nearest_code: vectors of width {z.shape[-1]} against a codebook of shape "
            f"{tuple(codebook.shape)}"
        )
    dtype = torch.promote_types(z.dtype, torch.float32)
    flat = z.reshape(-1, z.shape[-1]).to(dtype)
    e = codebook.to(dtype)
    e2 = e.pow(2).sum(1)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=z.device)
    for s in range(0, flat.shape[0], chunk):
        x = flat[s : s + chunk]
        d = x.pow(2).sum(1, keepdim=True) + e2 - 2 * x @ e.t()
        out[s : s + chunk] = d.argmin(1)
    return out.reshape(z.shape[:-1])


class VQOutput(NamedTuple):
    """What a codebook's forward returns.

    ids: ``[...]`` code ids; quantized: ``[..., d]`` straight-through codes (value = the code, gradient =
    identity to the encoder output); loss: scalar VQ loss (codebook + commitment terms as documented by
    each codebook); z: ``[..., d]`` the encoder output the ids were assigned from (L2-normalised for the
    cosine codebook).
    """

    ids: torch.Tensor
    quantized: torch.Tensor
    loss: torch.Tensor
    z: torch.Tensor


class _Codebook(nn.Module):
    """Common part: ``embedding.weight [K, d]`` (the official key ``quantize.embedding.weight``)."""

    def __init__(self, num_codes: int, code_dim: int) -> None:
        super().__init__()
        check_int(num_codes, "codebook_size", lo=1)
        check_int(code_dim, "codebook_dim", lo=1)
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.embedding = nn.Embedding(num_codes, code_dim)
        # pick frequency for restart_dead_ (training only; not in the state dict)
        self.register_buffer("usage", torch.ones(num_codes), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes of ``ids``: ``[...] -> [..., d]`` (ids are validated)."""
        return F.embedding(check_ids(ids, self.num_codes), self.embedding.weight)

    def ids_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Nearest-code ids of ``codes`` ``[..., d] -> [...]``; exact inverse of :meth:`lookup`."""
        return nearest_code(codes, self.embedding.weight)

    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        return z

    @torch.no_grad()
    def restart_dead_(
        self, z: torch.Tensor, ids: torch.Tensor, decay: float = 0.95, threshold: float = 0.05
    ) -> int:
        """Training-time dead-code restart; returns how many codes were restarted.

        Keeps an exponential moving average of how often each code is picked (``usage <- decay * usage +
        (1 - decay) * counts``, a non-persistent buffer, so the state dict keeps the official single key);
        codes whose average falls below ``threshold`` are moved onto random encoder outputs of this batch
        (``z [..., d]``, prepared as the codebook compares them) and their average reset to 1. Why: a
        gradient-trained codebook only moves the rows that win, so rows that never win stay dead — SEED's
        plain Euclidean quantizer used 12 of 1024 codes on ShapesVQA without this (spec: "watch codebook
        utilisation"; the restart is the usual remedy, a deviation the spec allows if it collapses).
        """
        zs = self._prepare(z.detach()).reshape(-1, self.code_dim).float()
        counts = torch.bincount(ids.reshape(-1), minlength=self.num_codes).float()
        usage = self.usage
        usage.mul_(decay).add_(counts.to(usage.device), alpha=1 - decay)
        dead = (usage < threshold).nonzero().flatten()
        if dead.numel() and zs.shape[0]:
            g = torch.randint(zs.shape[0], (dead.numel(),), device=zs.device)
            self.embedding.weight[dead] = zs[g].to(self.embedding.weight.dtype)
            usage[dead] = 1.0
        return int(dead.numel()) if zs.shape[0] else 0

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """Code ids of encoder outputs ``[..., d] -> [...]`` (no gradient, no loss)."""
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"codebook: inputs have width {z.shape[-1]}, codebook_dim={self.code_dim}")
        return nearest_code(self._prepare(z), self.embedding.weight)


class EuclideanCodebook(_Codebook):
    """SEED's vector quantizer (spec §2.2 step 5, §2.4): taming ``VectorQuantizer2`` with ``legacy=True``.

    ``id = argmin_k |z - e_k|^2`` on the raw (unnormalised) ``z``; straight-through output
    ``z + sg(e - z)``. Loss (``legacy=True``, official): ``mean((sg(e) - z)^2) + beta * mean((e - sg(z))^2)``,
    i.e. beta multiplies the **codebook** term (the historical swap kept for weight parity);
    ``legacy=False`` gives the textbook ``beta * commitment + codebook``. Init uniform ``(-1/K, 1/K)``.
    """

    def __init__(self, num_codes: int, code_dim: int, beta: float = 0.25, legacy: bool = True) -> None:
        super().__init__(num_codes, code_dim)
        self.beta = beta
        self.legacy = legacy
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / num_codes, 1.0 / num_codes)

    def forward(self, z: torch.Tensor) -> VQOutput:
        ids = self.assign(z.detach())
        e = self.embedding(ids)
        commit = torch.mean((e.detach() - z) ** 2)  # pulls the encoder toward its code
        book = torch.mean((e - z.detach()) ** 2)  # pulls the code toward the encoder
        loss = commit + self.beta * book if self.legacy else self.beta * commit + book
        return VQOutput(ids, z + (e - z).detach(), loss, z)


class CosineCodebook(_Codebook):
    """LaVIT's codebook (spec §3.1 step 5, §3.4): L2-normalised inputs, rows L2-normalised at init.

    ``id = argmin_k |ẑ - e_k|^2`` with ``ẑ = z / |z|`` (= max cosine while the rows stay unit length; the
    official lookup does not renormalise the rows, nor does this one). Straight-through
    ``ẑ + sg(e - ẑ)``. Loss: ``beta * mean((ẑ - sg(e))^2)`` (commitment) plus, unless ``ema`` is on,
    ``mean((e - sg(ẑ))^2)`` (codebook). With ``ema=True`` the rows are instead moved by
    :meth:`ema_update` (the §3.4 trick; LaVIT's training code is unreleased, so these are our choices).
    The EMA statistics are non-persistent buffers: the state dict keeps the official single key.
    """

    def __init__(self, num_codes: int, code_dim: int, beta: float = 0.25, ema: bool = False) -> None:
        super().__init__(num_codes, code_dim)
        self.beta = beta
        self.ema = ema
        with torch.no_grad():
            self.embedding.weight.copy_(F.normalize(torch.randn(num_codes, code_dim), dim=-1))
        self.register_buffer("cluster_size", torch.zeros(num_codes), persistent=False)
        self.register_buffer("embed_sum", self.embedding.weight.detach().clone(), persistent=False)

    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, p=2, dim=-1)

    def forward(self, z: torch.Tensor) -> VQOutput:
        zn = self._prepare(z)
        ids = nearest_code(zn.detach(), self.embedding.weight)
        e = self.embedding(ids)
        loss = self.beta * torch.mean((zn - e.detach()) ** 2)
        if not self.ema:
            loss = loss + torch.mean((e - zn.detach()) ** 2)
        return VQOutput(ids, zn + (e - zn).detach(), loss, zn)

    @torch.no_grad()
    def reset_ema_(self) -> None:
        """Restart the EMA statistics from the current rows (after loading weights or a k-means init)."""
        self.embed_sum.copy_(self.embedding.weight)
        self.cluster_size.fill_(1.0)

    @torch.no_grad()
    def ema_update(
        self, zn: torch.Tensor, ids: torch.Tensor, decay: float = 0.99, dead_threshold: float = 0.0
    ) -> int:
        """One EMA step on normalised vectors ``zn [n, d]`` assigned to ``ids [n]``; returns codes restarted.

        ``cluster_size <- decay * cluster_size + (1 - decay) * counts``, ``embed_sum`` likewise with the
        per-code sums, rows = ``normalize(embed_sum)`` (spherical means). Codes whose EMA count falls below
        ``dead_threshold`` are restarted on random vectors of the batch (dead-code revival).
        """
        zn = zn.reshape(-1, self.code_dim).float()
        ids = ids.reshape(-1)
        counts = torch.bincount(ids, minlength=self.num_codes).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, ids, zn)
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        self.embedding.weight.copy_(F.normalize(self.embed_sum, dim=-1))
        dead = (self.cluster_size < dead_threshold).nonzero().flatten()
        if dead.numel() and zn.shape[0]:
            pick = zn[torch.randint(zn.shape[0], (dead.numel(),), device=zn.device)]
            self.embedding.weight[dead] = F.normalize(pick, dim=-1)
            self.embed_sum[dead] = self.embedding.weight[dead]
            self.cluster_size[dead] = 1.0
        return int(dead.numel())


@torch.no_grad()
def kmeans(
    samples: torch.Tensor, k: int, iters: int = 10, cosine: bool = False, seed: int = 0
) -> torch.Tensor:
    """``k`` centroids ``[k, d]`` of ``samples [n, d]`` by Lloyd's algorithm (spherical if ``cosine``).

    The k-means codebook initialisation of spec §3.4 (LaVIT issue #29). Initial centroids are ``k``
    samples drawn with a fixed generator (with replacement when ``n < k``); an empty cluster keeps its
    previous centroid.
    """
    x = samples.reshape(-1, samples.shape[-1]).float()
    if cosine:
        x = F.normalize(x, dim=-1)
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    pick = torch.randperm(n, generator=g)[:k] if n >= k else torch.randint(n, (k,), generator=g)
    c = x[pick.to(x.device)].clone()
    for _ in range(iters):
        a = nearest_code(x, c)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        cnt = torch.bincount(a, minlength=k).float()
        filled = cnt > 0
        c[filled] = sums[filled] / cnt[filled, None]
        if cosine:
            c = F.normalize(c, dim=-1)
    return c


def codebook_usage(ids: torch.Tensor, num_codes: int) -> dict[str, float]:
    """Usage statistics of a set of code ids: perplexity ``exp(H(p))`` of the empirical code distribution
    (``num_codes`` = uniform use, 1 = collapse), codes used at least once, dead codes, used fraction."""
    ids = check_ids(ids, num_codes).reshape(-1)
    counts = torch.bincount(ids, minlength=num_codes).double()
    total = counts.sum()
    if total == 0:
        return {"perplexity": 0.0, "used": 0, "dead": num_codes, "used_fraction": 0.0, "n": 0}
    p = counts / total
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {
        "perplexity": float(ent.exp()),
        "used": used,
        "dead": num_codes - used,
        "used_fraction": used / num_codes,
        "n": int(total),
    }


# -- LLM vocabulary ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VocabLayout:
    """Where image tokens live in an extended LLM vocabulary (spec §2.5 SEED, §3.1 step 6 / §3.3 LaVIT).

    Attributes:
        offset: LLM id of code 0; code ``i`` is LLM id ``offset + i``.
        num_codes: codebook size ``K``.
        boi_id, eoi_id: LLM ids of the begin / end image tokens.
        vocab_size: rows of the extended embedding matrix.
        boi_token, eoi_token: their strings.
        code_token: ``str.format`` pattern of a code's token string (SEED: ``"<img_{:05d}>"``), or ``""``
            when codes have no strings and are injected as ids (LaVIT).
    """

    offset: int
    num_codes: int
    boi_id: int
    eoi_id: int
    vocab_size: int
    boi_token: str = "<img>"
    eoi_token: str = "</img>"
    code_token: str = ""

    def __post_init__(self) -> None:
        for f in ("offset", "boi_id", "eoi_id"):
            check_int(getattr(self, f), f, lo=0)
        check_int(self.num_codes, "num_codes", lo=1)
        check_int(self.vocab_size, "vocab_size", lo=1)
        end = self.offset + self.num_codes
        if end > self.vocab_size:
            raise ValueError(f"code ids {self.offset}..{end - 1} exceed vocab_size={self.vocab_size}")
        for f in ("boi_id", "eoi_id"):
            v = getattr(self, f)
            if self.offset <= v < end or v >= self.vocab_size:
                raise ValueError(
                    f"{f}={v} is not allowed: it must be < vocab_size={self.vocab_size} and outside the code "
                    f"ids {self.offset}..{end - 1}"
                )
        if self.boi_id == self.eoi_id:
            raise ValueError(f"boi_id and eoi_id are both {self.boi_id}; they must differ")

    @property
    def code_range(self) -> range:
        """The LLM ids of the codes."""
        return range(self.offset, self.offset + self.num_codes)

    def to_llm_ids(self, ids: torch.Tensor, add_special: bool = True) -> torch.Tensor:
        """Code ids ``[..., n]`` -> LLM ids ``[..., n (+2)]``: ``offset`` added, BOI / EOI around each row."""
        ids = check_ids(ids, self.num_codes)
        out = ids.long() + self.offset
        if not add_special:
            return out
        boi = out.new_full((*out.shape[:-1], 1), self.boi_id)
        eoi = out.new_full((*out.shape[:-1], 1), self.eoi_id)
        return torch.cat([boi, out, eoi], dim=-1)

    def is_code(self, llm_ids: torch.Tensor) -> torch.Tensor:
        return (llm_ids >= self.offset) & (llm_ids < self.offset + self.num_codes)

    def from_llm_ids(self, llm_ids: torch.Tensor) -> torch.Tensor:
        """LLM ids of one image ``[n]`` (optionally wrapped in BOI ... EOI) -> code ids ``[n]``.

        Anything else than image codes between the (optional) BOI / EOI raises, naming the value and the
        allowed range.
        """
        if llm_ids.dim() != 1:
            raise ValueError(f"from_llm_ids: expected one image's ids [n], got shape {tuple(llm_ids.shape)}")
        x = llm_ids
        if x.numel() and int(x[0]) == self.boi_id:
            x = x[1:]
        if x.numel() and int(x[-1]) == self.eoi_id:
            x = x[:-1]
        bad = ~self.is_code(x)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"from_llm_ids: id {int(x[i])} at position {i} is not an image code; allowed: "
                f"{self.offset}..{self.offset + self.num_codes - 1} between optional BOI {self.boi_id} and "
                f"EOI {self.eoi_id}"
            )
        return x.long() - self.offset

    def token_strings(self, ids: torch.Tensor) -> list[str]:
        """Token strings of code ids (SEED style ``<img_00042>``); needs ``code_token``."""
        if not self.code_token:
            raise ValueError("token_strings: this layout has no code token strings (code_token='')")
        return [self.code_token.format(int(i)) for i in check_ids(ids, self.num_codes).reshape(-1)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VocabLayout:
        return cls(**d)


#: SEED-LLaMA (§2.5): ``<img_00000>``..``<img_08191>`` at 32000..40191 after the 32000 LLaMA tokens, then
#: ``<img>`` / ``</img>`` (vocab 40194). The BOI / EOI order is our reading of the added-token order [I];
#: the official code looks them up through the tokenizer, as :func:`extend_vocab` does.
SEED_OFFICIAL_LAYOUT = VocabLayout(
    offset=32000,
    num_codes=8192,
    boi_id=40192,
    eoi_id=40193,
    vocab_size=40194,
    boi_token="<img>",
    eoi_token="</img>",
    code_token="<img_{:05d}>",
)
#: LaVIT (§3.1 step 6): [IMG] = 32000, [/IMG] = 32001, codes 32002..48385 (vocab 48386); the LLaMA
#: tokenizer itself is unchanged (ids injected).
LAVIT_OFFICIAL_LAYOUT = VocabLayout(
    offset=32002,
    num_codes=16384,
    boi_id=32000,
    eoi_id=32001,
    vocab_size=48386,
    boi_token="[IMG]",
    eoi_token="[/IMG]",
    code_token="",
)


def _embedding_rows(model: Any) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def extend_vocab(
    tokenizer: Any,
    model: Any,
    num_codes: int,
    *,
    style: str = "seed",
    boi_token: str | None = None,
    eoi_token: str | None = None,
    code_token: str | None = None,
    add_tokens: bool = True,
    mean_resizing: bool = False,
    pad_to_multiple_of: int | None = None,
) -> VocabLayout:
    """Extend an LLM's vocabulary with ``num_codes`` image codes plus begin / end image tokens.

    Layouts (``style``), with ``V`` the current vocabulary (spec §2.5, §3.1 step 6):

    * ``"seed"``: codes at ``V .. V+K-1`` with token strings ``<img_00000>`` ..., then ``<img>`` = ``V+K``,
      ``</img>`` = ``V+K+1``;
    * ``"lavit"``: ``[IMG]`` = ``V``, ``[/IMG]`` = ``V+1``, codes at ``V+2 .. V+K+1``; by default the codes
      get no token strings (LaVIT injects ids; pass ``code_token`` to add strings anyway).

    With ``add_tokens`` (default) the strings are added to ``tokenizer`` and the resulting ids are checked
    against the layout (a string that already exists would break contiguity and raises). That needs
    ``len(tokenizer)`` to equal the model's embedding rows, else new strings would land on existing rows;
    with ``add_tokens=False`` the tokenizer is untouched and ``V`` is the model's row count (ids are
    injected, as LaVIT does). Then ``model.resize_token_embeddings`` grows ``embed_tokens`` and ``lm_head``;
    existing rows are kept, new rows are trained (SEED does not initialise them from code vectors;
    ``mean_resizing`` picks transformers' mean/covariance init instead of its default normal init).
    ``model=None`` extends only the tokenizer. In the ``"lavit"`` style without code strings, tokens added
    to the tokenizer later would take the code ids: add them before calling this.

    Returns:
        the :class:`VocabLayout`; ``layout.to_llm_ids(ids)`` builds an image's LLM ids.
    """
    if style not in ("seed", "lavit"):
        raise ValueError(f"style={style!r} is not allowed; choose one of ('seed', 'lavit')")
    check_int(num_codes, "num_codes", lo=1)
    if style == "seed":
        boi_token = boi_token or "<img>"
        eoi_token = eoi_token or "</img>"
        code_token = "<img_{:05d}>" if code_token is None else code_token
    else:
        boi_token = boi_token or "[IMG]"
        eoi_token = eoi_token or "[/IMG]"
        code_token = code_token or ""
    if add_tokens and style == "seed" and not code_token:
        raise ValueError("style='seed' adds code token strings; code_token must be a non-empty pattern")
    if tokenizer is None and add_tokens:
        raise ValueError("extend_vocab: add_tokens=True needs a tokenizer")
    rows = _embedding_rows(model) if model is not None else None
    if add_tokens:
        base = len(tokenizer)
        if rows is not None and rows != base:
            raise ValueError(
                f"extend_vocab: the tokenizer has {base} tokens but the model's input embeddings have {rows} "
                f"rows; new token strings would get ids {base}.. that are already model rows. Pass "
                f"add_tokens=False to append ids after row {rows - 1} without token strings"
            )
    else:
        if rows is None:
            raise ValueError(
                "extend_vocab: add_tokens=False needs a model (the ids follow its embedding rows)"
            )
        base = rows

    if style == "seed":
        offset, boi_id, eoi_id = base, base + num_codes, base + num_codes + 1
    else:
        boi_id, eoi_id, offset = base, base + 1, base + 2
    new_size = base + num_codes + 2
    layout = VocabLayout(
        offset=offset,
        num_codes=num_codes,
        boi_id=boi_id,
        eoi_id=eoi_id,
        vocab_size=new_size,
        boi_token=boi_token,
        eoi_token=eoi_token,
        code_token=code_token,
    )

    if add_tokens:
        from tokenizers import AddedToken

        def tok(s: str, special: bool) -> AddedToken:
            # not normalised: a lowercasing normaliser must not change the token strings
            return AddedToken(s, normalized=False, special=special)

        codes = [tok(code_token.format(i), False) for i in range(num_codes)] if code_token else []
        specials = [tok(boi_token, True), tok(eoi_token, True)]
        order = codes + specials if style == "seed" else specials + codes
        added = tokenizer.add_tokens(order)
        want = {boi_token: boi_id, eoi_token: eoi_id}
        if codes:
            want[code_token.format(0)] = offset
            want[code_token.format(num_codes - 1)] = offset + num_codes - 1
        got = {s: tokenizer.convert_tokens_to_ids(s) for s in want}
        if added != len(order) or got != want:
            raise ValueError(
                f"extend_vocab: the tokenizer did not place the new tokens contiguously (added {added} of "
                f"{len(order)}; ids {got}, expected {want}); some token strings probably already exist"
            )
    if model is not None:
        model.resize_token_embeddings(
            new_size, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=mean_resizing
        )
        rows = _embedding_rows(model)
        if rows != layout.vocab_size:  # pad_to_multiple_of rounded up
            layout = dataclasses.replace(layout, vocab_size=rows)
    return layout


class LlmVocabMixin:
    """The LLM-vocabulary plumbing SEED and LaVIT share (SEED §2.5, LaVIT §3.1 step 6).

    A tokenizer module sets ``_vocab_style`` (``"seed"``: one token string per code; ``"lavit"``: codes
    get no strings, ids are injected) and ``_official_layout`` (the released model's ids), and holds
    ``self.config.codebook_size`` and ``self.vocab`` (``None`` until :meth:`extend_vocab`).
    """

    _vocab_style: ClassVar[str]
    _official_layout: ClassVar[VocabLayout]

    def extend_vocab(self, tokenizer: Any, model: Any, **kwargs: Any) -> VocabLayout:
        """Add the image tokens to ``tokenizer`` and resize ``model``'s embeddings (:func:`extend_vocab`
        in this module's style); stores the layout in ``self.vocab`` and returns it."""
        self.vocab = extend_vocab(
            tokenizer, model, self.config.codebook_size, style=self._vocab_style, **kwargs
        )
        return self.vocab

    def _layout(self, layout: VocabLayout | None) -> VocabLayout:
        layout = layout or self.vocab or self._official_layout
        if layout.num_codes != self.config.codebook_size:
            raise ValueError(
                f"vocab layout has {layout.num_codes} codes, the codebook {self.config.codebook_size}; call "
                f"extend_vocab first"
            )
        return layout

    def from_llm_ids(self, llm_ids: torch.Tensor, layout: VocabLayout | None = None) -> torch.Tensor:
        """LLM ids -> code ids (same shape), under ``layout`` / ``self.vocab`` / the official layout."""
        return self._layout(layout).from_llm_ids(llm_ids)
