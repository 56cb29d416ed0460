"""lmms-eval plugin: any model ``zoo.load`` can open, compressed by any mmcompress method.

Registered through the ``lmms_eval.models`` entry point (``pyproject.toml``), no fork of lmms-eval::

    python -m lmms_eval --model mmcompress \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=hired,keep=0.2 --tasks gqa
    accelerate launch --num_processes 8 -m lmms_eval --model mmcompress --model_args ... --tasks ...

``model_args``: ``pretrained`` (embedded name, folder or hub id), ``method`` (default ``none``), ``keep``
(the method's budget), ``dtype`` (``auto``: bf16 on CUDA), ``prompt_style`` (``auto`` / ``chat`` /
``llava`` / ``zoo``), ``max_new_tokens`` (when the task gives none); any other key is a field of the
method's config (e.g. ``method=hired,keep=0.2,alpha=0.5``).

It is a "simple" lmms model (``is_simple = True``): requests carry the task's text and a
``doc_to_visual`` callable, one image per request. ``generate_until`` answers greedily through
:class:`mmcompress.evals.runner.HFBackend` (the same code path as ``mmcompress eval``);
``loglikelihood`` scores a continuation with one forward pass of the (compressed) model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lmms_eval.api.model import lmms

from .datasets import EvalSample
from .runner import HFBackend, build_prompt, make_method

__all__ = ["MMCompressLMM", "manifest"]

MODEL_ID = "mmcompress"


def manifest():
    """The entry point's payload: lmms-eval calls it and registers the returned manifest."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.MMCompressLMM")


def _flatten(xs: Any) -> list:
    if isinstance(xs, (list, tuple)):
        return [y for x in xs for y in _flatten(x)]
    return [xs]


class MMCompressLMM(lmms):
    """lmms-eval model ``mmcompress``; see the module docstring for ``model_args``."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "shapes-llava",
        method: str = "none",
        keep: int | float | None = None,
        device: str | None = None,
        dtype: str = "auto",
        prompt_style: str = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_new_tokens: int = 16,
        **method_fields: Any,
    ) -> None:
        super().__init__()
        del max_batch_size  # lmms-eval passes it to every model; batches here are fixed-size
        # bad method options fail before the model is loaded
        if method != "none":
            make_method(method, keep, **method_fields)
        elif method_fields:
            raise ValueError(
                f"model_args {sorted(method_fields)} are not plugin options (and no method is set)"
            )
        rank, world, dev = 0, 1, device
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch: lmms-eval shards the docs by rank
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
            rank, world = self.accelerator.process_index, self.accelerator.num_processes
            dev = self.accelerator.device
        elif dev is None:
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self._rank, self._world_size = rank, world
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.backend = HFBackend(pretrained, device=dev, dtype=dtype, prompt_style=prompt_style)
        self._device = self.backend.device
        self.backend.set_method(method, keep, **method_fields)

    # lmms-eval reads these
    @property
    def model(self):
        return self.backend.model

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _sample(self, request) -> tuple[EvalSample, dict]:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        images = [v for v in _flatten(doc_to_visual(self.task_dict[task][split][doc_id])) if v is not None]
        if len(images) != 1:
            raise ValueError(
                f"task {task!r} doc {doc_id}: {len(images)} images; the mmcompress plugin takes exactly one"
            )
        text = context.replace("<image>", "").strip()
        s = EvalSample(id=str(doc_id), question=text, prompt=text, target=None, image=images[0])
        return s, dict(gen_kwargs or {})

    def generate_until(self, requests) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(requests):
            s, kw = self._sample(requests[i])
            batch, kws = [s], [kw]
            max_new = int(kw.get("max_new_tokens") or self.max_new_tokens)
            while len(batch) < self.batch_size_per_gpu and i + len(batch) < len(requests):
                s2, kw2 = self._sample(requests[i + len(batch)])
                if int(kw2.get("max_new_tokens") or self.max_new_tokens) != max_new:
                    break
                batch.append(s2)
                kws.append(kw2)
            for o, k in zip(self.backend.answer(batch, max_new), kws):
                until = k.get("until") or []
                text = o.pred
                for stop in [until] if isinstance(until, str) else until:
                    if stop:
                        text = text.split(stop)[0]
                out.append(text)
            i += len(batch)
        return out

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        proc, model, style = self.backend.processor, self.backend.model, self.backend.style
        res = []
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            images = [v for v in _flatten(doc_to_visual(doc)) if v is not None]
            if len(images) != 1:
                raise ValueError(f"task {task!r} doc {doc_id}: {len(images)} images; the plugin takes one")
            prompt = build_prompt(proc, context.replace("<image>", "").strip(), style)
            img = images[0].convert("RGB")
            n_prompt = proc(images=img, text=prompt, return_tensors="pt")["input_ids"].shape[1]
            enc = proc(images=img, text=prompt + continuation, return_tensors="pt")
            dtype = next(model.parameters()).dtype
            enc = {
                k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in enc.items()
            }
            n_cont = enc["input_ids"].shape[1] - n_prompt
            if n_cont < 1:
                raise ValueError(f"continuation {continuation!r} adds no tokens to the prompt")
            cont = enc["input_ids"][0, -n_cont:]
            # compression may shorten the sequence inside forward; the continuation is at its end either way
            logits = model(**enc).logits[0, -n_cont - 1 : -1].float()
            logp = torch.log_softmax(logits, -1)
            res.append((float(logp.gather(-1, cont[:, None]).sum()), bool((logits.argmax(-1) == cont).all())))
        return res

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mmcompress: multi-round generation is not supported")
