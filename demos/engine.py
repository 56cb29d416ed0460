"""The demo's logic without gradio: load and cache models, answer one request twice (baseline and
compressed) and draw which visual tokens were kept (issue 8, "Gradio demo"; DESIGN §3, §7).

Everything here is plain Python, torch and PIL, so it is tested without a browser;
:mod:`mmcompress.demos.app` is a thin gradio UI on top::

    engine = DemoEngine()
    req = make_request("shapes-llava", "divprune", "64", "how many objects are there?")
    res = engine.run("scene.png", req)        # -> DemoResult
    res.baseline.text, res.compressed.text, res.compressed.visual_tokens
    res.overlay().save("kept.png")

Concurrency. A demo server shares one model instance between all its users, and ``compress`` /
``generate`` / ``report`` / ``restore`` all act on that instance (the patches and the last report live on
it). So each request runs that whole sequence holding the model's own lock: requests on one model are
serialised, requests on different models run in parallel, and a request's method and budget can never
reach another request's generate or report.

Input limits (the page shows these messages instead of a traceback):

* an image must be a file PIL can decode, at least :data:`MIN_SIDE` px on each side and at most
  :data:`MAX_PIXELS` pixels (checked from the header, before decoding);
* a question must be non-empty and at most :data:`MAX_QUESTION_CHARS` characters.
"""

from __future__ import annotations

import colorsys
import os
import re
import socket
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image, ImageDraw

import mmcompress as mmc
from mmcompress import registry, zoo
from mmcompress.config import PreLLMMethod
from mmcompress.evals.compare import machine_info
from mmcompress.evals.harness import Generation, parse_keep, timed_generate
from mmcompress.tokens import Layout

__all__ = [
    "DEFAULT_MODEL",
    "MAX_NEW_TOKENS",
    "MAX_PIXELS",
    "MAX_QUESTION_CHARS",
    "MIN_SIDE",
    "DemoEngine",
    "DemoInputError",
    "DemoRequest",
    "DemoResult",
    "GenerationStats",
    "LoadedModel",
    "ModelCache",
    "check_question",
    "hidden_tokens",
    "hub_reachable",
    "load_image",
    "make_request",
    "model_views",
    "parse_budget",
    "pre_llm_methods",
    "render_overlay",
]

DEFAULT_MODEL = "shapes-llava"
#: largest accepted image, in pixels (width x height): 16.8 MP, e.g. 4096 x 4096. The processors shrink
#: every image to a few hundred pixels anyway; the cap keeps a decompression bomb from eating the server.
MAX_PIXELS = 4096 * 4096
#: smallest accepted side, in pixels: one 14 px ViT patch.
MIN_SIDE = 14
MAX_QUESTION_CHARS = 300
#: the embedded models answer in one word then ``</s>``; a few more tokens let larger models finish a phrase
MAX_NEW_TOKENS = 8
#: how long the hub reachability probe may take before a hub id is declared unreachable
HUB_PROBE_TIMEOUT_S = 3.0

# a hub id: "name" or "owner/name" of letters, digits, "-", "_", "."
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class DemoInputError(ValueError):
    """A problem with what the user uploaded, typed or picked, worded to be shown in the page."""


# -- inputs ------------------------------------------------------------------------------------------


def load_image(
    source: str | os.PathLike | Image.Image | None,
    *,
    max_pixels: int = MAX_PIXELS,
    min_side: int = MIN_SIDE,
) -> Image.Image:
    """The uploaded image as RGB, or :class:`DemoInputError` saying why not.

    The pixel count is checked from the header, before the pixels are decoded, so a huge upload costs
    nothing; PIL's own decompression-bomb limit (far above ours) never gets a chance to fire. An animated
    image gives its first frame.
    """
    if source is None or (isinstance(source, str) and not source.strip()):
        raise DemoInputError("no image: upload a picture or load a ShapesVQA sample first")
    if isinstance(source, Image.Image):
        _check_size(source.size, max_pixels, min_side)
        return source.convert("RGB")
    if not isinstance(source, (str, os.PathLike)):
        raise DemoInputError(f"image={source!r} is invalid; allowed: a file path or a PIL image")
    path = Path(source)
    if not path.is_file():
        raise DemoInputError(f"the uploaded image {path.name!r} is missing on the server; upload it again")
    if path.stat().st_size == 0:
        raise DemoInputError(f"the uploaded file {path.name!r} is empty, not an image")
    try:
        with warnings.catch_warnings():
            # our own, lower limit below replaces PIL's warning for 89-179 MP images
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        _check_size(im.size, max_pixels, min_side)
        im.seek(0)
        im.load()  # decode now: a truncated file fails here, with our message
        return im.convert("RGB")
    except Image.DecompressionBombError:  # over 2x PIL's limit: PIL refuses before reading the size
        raise DemoInputError(
            f"the uploaded image {path.name!r} is too large; the limit is {max_pixels:,} pixels"
        ) from None
    except DemoInputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # Image.UnidentifiedImageError is an OSError
        raise DemoInputError(
            f"the uploaded file {path.name!r} is not an image PIL can read "
            f"(PNG, JPEG, WebP, BMP, GIF, ...): {e}"
        ) from None


def _check_size(size: tuple[int, int], max_pixels: int, min_side: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise DemoInputError(
            f"the image is {w} x {h} = {w * h:,} pixels; the limit is {max_pixels:,} pixels "
            f"(e.g. 4096 x 4096); scale it down and upload it again"
        )
    if min(w, h) < min_side:
        raise DemoInputError(f"the image is {w} x {h} pixels; each side must be at least {min_side} px")


def check_question(question: Any) -> str:
    """The question, stripped; :class:`DemoInputError` if it is empty or too long."""
    if not isinstance(question, str) or not question.strip():
        raise DemoInputError("the question is empty: type a question about the image")
    q = question.strip()
    if len(q) > MAX_QUESTION_CHARS:
        raise DemoInputError(f"the question has {len(q)} characters; the limit is {MAX_QUESTION_CHARS}")
    return q


def parse_budget(text: Any) -> int | float | None:
    """The budget box: empty -> the method's default; ``"64"`` -> 64 tokens; ``"0.25"`` -> a quarter."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, bool):
        raise DemoInputError(f"keep={text!r} is invalid; allowed: an int >= 1 or a fraction in (0, 1]")
    if isinstance(text, (int, float)):
        return text
    try:
        return parse_keep(str(text))
    except ValueError as e:
        raise DemoInputError(str(e)) from None


def pre_llm_methods() -> list[str]:
    """Every registered pre-LLM method (the ones that choose which visual tokens the LLM sees)."""
    return [n for n in registry.names() if issubclass(registry.get(n), PreLLMMethod)]


@dataclass(frozen=True)
class DemoRequest:
    """One user request. ``keep=None`` uses the method's default budget."""

    question: str
    method: str
    keep: int | float | None = None
    model: str = DEFAULT_MODEL
    max_new_tokens: int = MAX_NEW_TOKENS

    def config(self) -> PreLLMMethod:
        """The validated method config (``ValueError`` naming the field if the budget is bad)."""
        return registry.create_with_budget(self.method, self.keep)


def make_request(
    model: Any, method: Any, keep: Any, question: Any, *, max_new_tokens: int = MAX_NEW_TOKENS
) -> DemoRequest:
    """A :class:`DemoRequest` from the page's raw values, every field checked (:class:`DemoInputError`)."""
    q = check_question(question)
    name = model.strip() if isinstance(model, str) and model.strip() else DEFAULT_MODEL
    methods = pre_llm_methods()
    if method not in methods:
        raise DemoInputError(f"method={method!r} is not available; allowed: {', '.join(methods)}")
    req = DemoRequest(q, method, parse_budget(keep), name, max_new_tokens)
    try:
        req.config()
    except (ValueError, TypeError) as e:
        raise DemoInputError(f"{method}: {e}") from None
    return req


# -- models ------------------------------------------------------------------------------------------


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub (``$HF_ENDPOINT``) answers a TCP connect within ``timeout`` seconds.

    ``from_pretrained`` on an unreachable hub retries with back-off for minutes before it fails; this
    probe lets the page say "offline" at once. ``HF_HUB_OFFLINE=1`` counts as unreachable.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False
    ok: list[bool] = []

    def probe() -> None:  # in a thread: name resolution itself has no timeout
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _resolve(name: str) -> str | Path:
    """What :func:`mmcompress.zoo.load` gets for the model box's value, or :class:`DemoInputError`."""
    if name in zoo.EMBEDDED:
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or name.startswith(("~", ".")):
        raise DemoInputError(f"model folder {name!r} does not exist on the server")
    if not _HUB_ID.match(name):
        raise DemoInputError(
            f"model={name!r} is invalid; allowed: {', '.join(zoo.EMBEDDED)}, a checkpoint folder on the "
            f"server, or a hub id like 'llava-hf/llava-1.5-7b-hf'"
        )
    try:  # already in the local hub cache: load that folder, no network needed
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001  (not cached, or huggingface_hub unusable: try the hub itself)
        pass
    if not hub_reachable():
        raise DemoInputError(
            f"model {name!r} is a hub id, but the Hugging Face hub ({_hub_endpoint()}) cannot be reached "
            f"from this server (offline?) and the model is not in its local cache. Use an embedded "
            f"model ({', '.join(zoo.EMBEDDED)}) or a checkpoint folder on the server."
        )
    return name


@dataclass
class LoadedModel:
    """A loaded model shared by every request for ``name``; ``lock`` serialises its requests."""

    name: str
    model: Any
    processor: Any
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def embedded(self) -> bool:
        return self.name in zoo.EMBEDDED

    @property
    def device(self) -> str:
        return machine_info(self.model)["device"]


class ModelCache:
    """Loaded models by name, least recently used first out beyond ``capacity``.

    Loads go through ``loader`` (default :func:`mmcompress.zoo.load`, as ``mmcompress run`` and
    ``compare`` do). One lock guards the table and the loads, so two first requests for the same model
    load it once. An evicted model stays alive for requests still holding it.
    """

    def __init__(
        self, loader: Callable[[Any], tuple[Any, Any]] = zoo.load, capacity: int = 3, warmup: bool = True
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r} is invalid; allowed: an int >= 1")
        self._loader, self._capacity, self._warmup = loader, capacity, warmup
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def get(self, name: str) -> LoadedModel:
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
            target = _resolve(name)
            try:
                model, processor = self._loader(target)
            except DemoInputError:
                raise
            except Exception as e:  # noqa: BLE001  (any loader failure becomes a message in the page)
                raise DemoInputError(f"could not load model {name!r}: {type(e).__name__}: {e}") from None
            entry = LoadedModel(name, model, processor)
            if self._warmup:
                _warm_up(entry)
            self._models[name] = entry
            while len(self._models) > self._capacity:
                self._models.popitem(last=False)
            return entry


def _warm_up(entry: LoadedModel) -> None:
    """One tiny generate, so the first user's time to first token has no one-off start-up cost in it."""
    size = getattr(entry.model.config.vision_config, "image_size", 224)
    image = Image.new("RGB", (size, size), (128, 128, 128))
    inputs = _encode(entry, image, "what is this?")
    with entry.lock:
        timed_generate(entry.model, inputs, max_new_tokens=1)


def _prompt(entry: LoadedModel, question: str) -> str:
    # The embedded models know one prompt format (the one `mmcompress run` uses); other checkpoints
    # bring a chat template that places the image and the question the way they were trained.
    if not entry.embedded and getattr(entry.processor, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return entry.processor.apply_chat_template(conv, add_generation_prompt=True)
    return zoo.build_prompt(question)


def _encode(entry: LoadedModel, image: Image.Image, question: str) -> dict:
    inputs = entry.processor(images=image, text=_prompt(entry, question), return_tensors="pt")
    return inputs.to(next(entry.model.parameters()).device)


# -- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationStats:
    """One timed ``generate()`` of a request (baseline or compressed)."""

    text: str  #: the decoded new tokens, special tokens removed
    token_ids: tuple[int, ...]  #: the new tokens
    visual_tokens: int  #: visual tokens the LLM saw
    ttft_ms: float  #: time to first token (vision tower + method + prefill)
    total_ms: float
    kv_bytes: int  #: bytes in the KV cache at the end

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens per second after the first one; None when only one token was generated."""
        steps = len(self.token_ids) - 1
        dt = (self.total_ms - self.ttft_ms) / 1e3
        return steps / dt if steps > 0 and dt > 0 else None


@dataclass(frozen=True)
class DemoResult:
    """Baseline and compressed answers to one request, and what the method kept."""

    request: DemoRequest
    method_config: dict
    baseline: GenerationStats
    compressed: GenerationStats
    kept: tuple[int, ...]  #: packed indices the LLM saw (merging methods: the merged tokens' slots)
    groups: tuple[int, ...] | None  #: ``[N]`` output slot of every input token (-1 dropped), merging only
    layout: Layout  #: where each of the N packed visual tokens sits
    method_ms: float
    views: tuple[Image.Image, ...]  #: what the vision tower saw: base view (or thumbnail), then crops
    device: str
    notes: tuple[str, ...] = ()

    def overlay(self, height: int = 336) -> Image.Image:
        """The kept-token picture (:func:`render_overlay`)."""
        return render_overlay(self.views, self.layout, self.kept, self.groups, height=height)

    def outcome(self) -> dict:
        """Everything that does not depend on timing: equal for equal requests on the same model."""
        gen = lambda g: (g.text, g.token_ids, g.visual_tokens, g.kv_bytes)  # noqa: E731
        return {
            "request": self.request,
            "method": self.method_config,
            "baseline": gen(self.baseline),
            "compressed": gen(self.compressed),
            "kept": self.kept,
            "groups": self.groups,
            "layout": self.layout,
        }

    def hidden_tokens(self) -> dict[str, tuple[int, int]]:
        """:func:`hidden_tokens` of this result."""
        return hidden_tokens(self.layout, self.kept)


def hidden_tokens(layout: Layout, kept: Sequence[int]) -> dict[str, tuple[int, int]]:
    """``{kind: (kept, total)}`` for the tokens the picture cannot show: CLS and row-end newlines."""
    mask = torch.zeros(layout.num_tokens, dtype=torch.bool)
    mask[list(kept)] = True
    out: dict[str, tuple[int, int]] = {}
    # a LLaVA-NeXT single-patch image packs its one newline as a 1x1 view named "newline"
    for v in layout.views:
        if v.name not in ("base", "crops"):
            k, n = out.get(v.name, (0, 0))
            out[v.name] = (k + int(mask[v.start : v.stop].sum()), n + v.num_tokens)
    nl = layout.newline_mask()
    if nl.any():
        k, n = out.get("newline", (0, 0))
        out["newline"] = (k + int(mask[nl].sum()), n + int(nl.sum()))
    return out


def _stats(entry: LoadedModel, g: Generation, visual_tokens: int) -> GenerationStats:
    ids = g.new_tokens[0].tolist()
    text = entry.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
    return GenerationStats(text, tuple(ids), visual_tokens, g.ttft_ms, g.total_ms, g.kv_bytes)


def _record_groups(handle: mmc.Handle, sink: list) -> None:
    """Keep each call's ``Selection.groups`` in ``sink``.

    The call report (:class:`~mmcompress.report.ImageReport`) carries the kept indices but not the merge
    groups, which the picture needs; the handle is this request's own (``restore`` drops it), so wrapping
    its ``select`` on the instance touches nothing shared.
    """
    select = handle.select

    def recording(features, layouts, signals):
        sels = select(features, layouts, signals)
        sink[:] = [None if s.groups is None else tuple(s.groups.tolist()) for s in sels]
        return sels

    handle.select = recording


class DemoEngine:
    """Runs requests on cached models; safe to call from many threads (see the module docstring)."""

    def __init__(self, models: ModelCache | None = None) -> None:
        self.models = models if models is not None else ModelCache()

    def run(self, image: str | os.PathLike | Image.Image | None, request: DemoRequest) -> DemoResult:
        """Answer ``request`` about ``image`` without and with compression (same instance, same inputs).

        Raises :class:`DemoInputError` for anything the user can fix (image, question, budget, a method
        the model cannot run, a model that cannot be loaded).
        """
        img = load_image(image)
        question = check_question(request.question)
        try:
            cfg = request.config()
        except (ValueError, TypeError) as e:
            raise DemoInputError(f"{request.method}: {e}") from None
        entry = self.models.get(request.model)
        notes = []
        with entry.lock:  # compress -> generate -> report -> restore touch the shared instance
            inputs = _encode(entry, img, question)
            n_in = int((inputs["input_ids"] == entry.model.config.image_token_id).sum())
            unk = entry.processor.tokenizer.unk_token_id
            if unk is not None and bool((inputs["input_ids"] == unk).any()):
                notes.append("some words of the question are unknown to this model's vocabulary")
            try:
                handle = mmc.compress(entry.model, cfg)
            except (ValueError, TypeError) as e:  # e.g. an AnyRes-only method on a single-view model
                raise DemoInputError(f"{request.method} cannot run on {request.model}: {e}") from None
            groups: list = []
            try:
                _record_groups(handle, groups)
                with mmc.disabled(entry.model):  # the baseline: same instance, patches bypassed
                    g_base = timed_generate(entry.model, inputs, max_new_tokens=request.max_new_tokens)
                g_comp = timed_generate(entry.model, inputs, max_new_tokens=request.max_new_tokens)
                rep = mmc.report(entry.model)
            finally:
                mmc.restore(entry.model)
        if rep is None or len(rep.images) != 1:
            raise RuntimeError(f"expected a report for one image, got {rep!r}")
        im = rep.images[0]
        if n_in != im.tokens_in:
            raise RuntimeError(f"prompt has {n_in} image placeholders, the method saw {im.tokens_in}")
        return DemoResult(
            request=request,
            method_config=cfg.to_dict(),
            baseline=_stats(entry, g_base, n_in),
            compressed=_stats(entry, g_comp, im.tokens_out),
            kept=tuple(im.kept),
            groups=groups[0] if groups else None,
            layout=im.layout,
            method_ms=rep.method_ms,
            views=tuple(model_views(inputs["pixel_values"], entry.processor.image_processor)),
            device=entry.device,
            notes=tuple(notes),
        )


# -- pictures ----------------------------------------------------------------------------------------


def model_views(pixel_values: torch.Tensor, image_processor: Any) -> list[Image.Image]:
    """The first image's views as the vision tower saw them, de-normalised to RGB.

    ``pixel_values`` is ``[B, 3, H, W]`` (one view per image, LLaVA-1.5) or ``[B, P, 3, H, W]``
    (LLaVA-NeXT: the thumbnail, then the crops row-major). Undoes ``(x * rescale - mean) / std``.
    """
    pv = pixel_values[0].detach().float().cpu()
    if pv.dim() == 3:
        pv = pv[None]
    if pv.dim() != 4 or pv.shape[1] != 3:
        raise ValueError(
            f"pixel_values: expected [B, 3, H, W] or [B, P, 3, H, W], got {tuple(pixel_values.shape)}"
        )
    if getattr(image_processor, "do_normalize", True):
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
        pv = pv * std + mean
    if getattr(image_processor, "do_rescale", True):  # back from rescale_factor units to 0..255
        pv = pv / float(image_processor.rescale_factor)
    arr = pv.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


# cell states of the overlay
_DROPPED, _KEPT, _MEMBER, _ABSENT = 0, 1, 2, 3
_FADE = (214, 214, 220)  # what a dropped token fades towards (washed out, visible on dark images too)
_OUTLINE = (255, 221, 0)  # around every kept token
_ABSENT_RGB = (70, 78, 96)  # canvas cells the model itself unpadded away (not tokens at all)


def _group_colour(slot: int) -> tuple[int, int, int]:
    # golden-ratio hue steps: neighbouring slots get far-apart colours
    r, g, b = colorsys.hsv_to_rgb((slot * 0.618033988749895) % 1.0, 0.8, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _paint(
    view: Image.Image, state: np.ndarray, colour: np.ndarray, size: tuple[int, int], dim: float
) -> Image.Image:
    """``view`` resized to ``size`` with each token cell shaded by ``state`` ``[rows, cols]``."""
    rows, cols = state.shape
    img = np.asarray(view.convert("RGB").resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    alpha = np.select([state == _DROPPED, state == _MEMBER, state == _ABSENT], [dim, 0.45, 0.85], 0.0).astype(
        np.float32
    )
    # nearest-neighbour upsampling of the cell grid to pixels (cell edges at round(i * size / n))
    ys = np.minimum((np.arange(size[1]) * rows) // size[1], rows - 1)
    xs = np.minimum((np.arange(size[0]) * cols) // size[0], cols - 1)
    a = alpha[ys][:, xs][..., None]
    c = colour[ys][:, xs]
    return Image.fromarray((img * (1 - a) + c * a).round().astype(np.uint8), "RGB")


def _outline(draw: ImageDraw.ImageDraw, origin: tuple[int, int], cell: tuple[float, float], rc) -> None:
    r, c = rc
    x0, y0 = origin[0] + round(c * cell[0]), origin[1] + round(r * cell[1])
    x1, y1 = origin[0] + round((c + 1) * cell[0]) - 1, origin[1] + round((r + 1) * cell[1]) - 1
    draw.rectangle((x0, y0, x1, y1), outline=_OUTLINE)


def render_overlay(
    views: Sequence[Image.Image],
    layout: Layout,
    kept: Sequence[int],
    groups: Sequence[int] | None = None,
    *,
    height: int = 336,
    dim: float = 0.72,
    gap: int = 8,
) -> Image.Image:
    """Which visual tokens the LLM saw, drawn on the views the vision tower saw.

    Args:
        views: ``views[0]`` the base view (single view, or the AnyRes thumbnail), ``views[1:]`` the
            AnyRes crops in row-major tile order (:func:`model_views`).
        layout: the packing of the ``N`` tokens (``base`` / ``crops`` grid views are drawn; CLS and
            newline tokens have no place on the picture, see :meth:`DemoResult.hidden_tokens`).
        kept: kept packed indices.
        groups: ``[N]`` output slot of every token (-1 dropped) for merging methods, else None.
        height: display height of each view, in pixels.
        dim: how much a dropped token fades to light grey (0: not at all, 1: flat grey).
        gap: pixels between the thumbnail and the crops, and between crops.

    Returns an RGB image: kept tokens keep their pixels and get a yellow outline, dropped ones fade to
    grey; for merging methods each group is tinted in its own colour and the outlined token is the one
    whose slot the merged token takes. For
    AnyRes, the thumbnail is on the left and the crops on the right with a gap between crops; cells the
    model unpadded away are slate grey.
    """
    n = layout.num_tokens
    kept_t = torch.as_tensor(list(kept), dtype=torch.long)
    if kept_t.numel() and (int(kept_t.min()) < 0 or int(kept_t.max()) >= n):
        raise ValueError(
            f"kept indices must lie in [0, {n}), got min {int(kept_t.min())} max {int(kept_t.max())}"
        )
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} tokens")
    if not views:
        raise ValueError("views is empty; need at least the base view")
    state_of = torch.full((n,), _DROPPED, dtype=torch.long)
    colour_of = np.tile(np.array(_FADE, dtype=np.float32), (n, 1))
    if groups is not None:
        g = torch.as_tensor(list(groups), dtype=torch.long)
        for i in torch.nonzero(g >= 0).flatten().tolist():
            state_of[i] = _MEMBER
            colour_of[i] = _group_colour(int(g[i]))
    state_of[kept_t] = _KEPT if groups is None else _MEMBER

    names = {v.name for v in layout.views}
    base = layout.view("base") if "base" in names else None
    crops = layout.view("crops") if "crops" in names else None
    if base is None:
        raise ValueError(f"layout has no 'base' view to draw; views are {sorted(names)}")
    scale = height / views[0].height
    panels: list[tuple[Image.Image, list[tuple[tuple[int, int], tuple[float, float], tuple[int, int]]]]] = []

    def view_panel(img: Image.Image, cells: torch.Tensor):
        """One view shaded; ``cells`` ``[rows, cols]`` packed indices (-1: not a token)."""
        rows, cols = cells.shape
        st = np.full((rows, cols), _ABSENT)
        col = np.tile(np.array(_ABSENT_RGB, dtype=np.float32), (rows, cols, 1))
        valid = cells >= 0
        st[valid.numpy()] = state_of[cells[valid]].numpy()
        col[valid.numpy()] = colour_of[cells[valid].numpy()]
        size = (round(img.width * scale), round(img.height * scale))
        outlines = [(r, c) for r, c in torch.nonzero(valid).tolist() if int(cells[r, c]) in set_kept]
        return _paint(img, st, col, size, dim), (size[0] / cols, size[1] / rows), outlines

    set_kept = set(kept_t.tolist())
    base_img, base_cell, base_out = view_panel(views[0], base.grid_indices())
    panels.append((base_img, [((0, 0), base_cell, rc) for rc in base_out]))

    if crops is not None and len(views) >= 1 + crops.tiles[0] * crops.tiles[1]:
        tr, tc = crops.tiles
        th, tw = crops.tile_shape
        top, left = crops.offset
        canvas = torch.full((tr * th, tc * tw), -1, dtype=torch.long)
        canvas[top : top + crops.rows, left : left + crops.cols] = crops.grid_indices()
        tiles = []
        for k in range(tr * tc):
            a, b = divmod(k, tc)
            tiles.append(view_panel(views[1 + k], canvas[a * th : (a + 1) * th, b * tw : (b + 1) * tw]))
        tw_px, th_px = tiles[0][0].size
        grid = Image.new("RGB", (tc * tw_px + (tc - 1) * gap, tr * th_px + (tr - 1) * gap), (255, 255, 255))
        outl = []
        for k, (img, cell, out) in enumerate(tiles):
            a, b = divmod(k, tc)
            origin = (b * (tw_px + gap), a * (th_px + gap))
            grid.paste(img, origin)
            outl += [(origin, cell, rc) for rc in out]
        panels.append((grid, outl))

    width = sum(p[0].width for p in panels) + gap * (len(panels) - 1)
    out = Image.new("RGB", (width, max(p[0].height for p in panels)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = 0
    for img, outl in panels:
        out.paste(img, (x, 0))
        for (ox, oy), cell, rc in outl:
            _outline(draw, (x + ox, oy), cell, rc)
        x += img.width + gap
    return out
