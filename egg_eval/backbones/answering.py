"""The answer pass: greedy generation from the whole image and the crops, V*'s option losses,
and the first token's confidence (the confidence stopping rule)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from egg_eval.backbones.compat import output_cache
from egg_eval.backbones.hooks import counts_tower
from egg_eval.backbones.prefix import Prefix
from egg_eval.phases import in_phase


class Answering:
    """The backbone's answers (a mixin of :class:`~egg_eval.backbones.base.Backbone`)."""

    def decoding(self) -> dict[str, Any]:
        """``generate``'s settings for every answer: greedy, one beam, no sampling settings.
        What the checkpoint's generation config sets besides sampling still applies, as in a
        plain ``generate`` call (lmms-eval's): Qwen2.5-VL-7B-Instruct's sets a repetition
        penalty of 1.05, which divides the logit of every token already in the prompt;
        ``repetition_penalty`` (1.0: none) overrides it."""
        kw: dict[str, Any] = {"do_sample": False, "num_beams": 1, "top_p": None, "top_k": None, "temperature": None}
        if self.repetition_penalty is not None:
            kw["repetition_penalty"] = self.repetition_penalty
        return kw

    def effective_decoding(self) -> dict[str, Any]:
        """The decoding settings the answers get, the checkpoint's own included (for the summary)."""
        gc = getattr(self.model, "generation_config", None)
        penalty = self.repetition_penalty
        if penalty is None:
            penalty = getattr(gc, "repetition_penalty", None) or 1.0
        return {"greedy": True, "repetition_penalty": float(penalty), "max_new_tokens": self.max_new_tokens}

    @torch.no_grad()
    @counts_tower
    def greedy_tokens(self, enc: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """Greedy-decode ``n`` tokens (1, n) from ``enc`` (one forward per token)."""
        if n <= 0:
            return torch.zeros((1, 0), dtype=torch.long, device=self.device)
        out = self.model.generate(**self.model_inputs(enc), max_new_tokens=n, min_new_tokens=n, **self.decoding())
        new = out[:, enc["input_ids"].shape[1] :]
        self.counters.n_forward += int(new.shape[1])
        return new

    @torch.no_grad()
    @in_phase("answer")
    @counts_tower
    def answer(
        self,
        images: Sequence[Image.Image],
        text: str,
        max_new_tokens: int | None = None,
        features: Sequence[Sequence[torch.Tensor]] | None = None,
        prefix: Prefix | None = None,
    ) -> str:
        """Greedy answer from ``images`` (whole image first, then crops) as real images in one
        prompt; ``features`` (one entry per image) reuses their already computed embeddings;
        ``prefix`` (the first image's grounding pass, with ``features``) spares the answer's
        prefill the tokens through that image."""
        t0 = time.perf_counter()
        enc = self._encode_for(images, text, features)
        p = self.prefix_length(enc, features, prefix)
        out = self.model.generate(
            **(self._on_prefix(enc, features, prefix, p) if p else self.inputs_with_features(enc, features)),
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            **self.decoding(),
        )
        new = out[0, enc["input_ids"].shape[1] :]
        self.counters.n_forward += max(1, int(new.shape[0]))
        self.counters.time_answer_s += time.perf_counter() - t0
        return self.processor.tokenizer.decode(new, skip_special_tokens=True).strip()

    @torch.no_grad()
    @in_phase("answer")
    @counts_tower
    def option_losses(
        self,
        images: Sequence[Image.Image],
        text: str,
        options: Sequence[str],
        features: Sequence[Sequence[torch.Tensor]] | None = None,
        prefix: Prefix | None = None,
    ) -> list[float]:
        """Mean token negative log-likelihood of each option's text as the assistant's answer
        (V*'s official protocol picks the option with the lowest).

        The prompt runs once, into a KV cache (continuing ``prefix``'s where it can, see
        :meth:`answer`); each option then runs only its own tokens on that cache, which is cut
        back to the prompt afterwards. Same losses as a full forward per option (tested), for
        one prompt's compute instead of one per option."""
        t0 = time.perf_counter()
        enc = self._encode_for(images, text, features)
        if features is None:  # embed the images once, not once per option
            features = [[f] for f in self.image_features(enc)]
        p = self.prefix_length(enc, features, prefix)
        kw = self._forward_on_prefix(enc, features, prefix, p) if p else self.inputs_with_features(enc, features)
        prompt = self.model(**kw, use_cache=True, logits_to_keep=1)
        self.counters.n_forward += 1
        first, cache = prompt.logits[0, -1:].float(), output_cache(prompt)
        tok = self.processor.tokenizer
        out = []
        for opt in options:
            ids = tok(" " + str(opt).strip(), add_special_tokens=False, return_tensors="pt").input_ids.to(self.device)
            if ids.shape[1] == 0:
                out.append(float("inf"))
                continue
            logits = first
            if ids.shape[1] > 1:  # the option's own tokens predict its next ones
                rest = self.model(input_ids=ids[:, :-1], **{self.cache_keyword: cache}, use_cache=True)
                rest = rest.logits[0].float()
                cache.crop(1 - ids.shape[1])  # a negative count removes that many last tokens
                self.counters.n_forward += 1
                logits = torch.cat([first, rest])
            out.append(float(torch.nn.functional.cross_entropy(logits, ids[0])))
        self.counters.time_answer_s += time.perf_counter() - t0
        return out

    @torch.no_grad()
    @counts_tower
    def first_token_max_prob(self, images: Sequence[Image.Image], text: str) -> float:
        """Max probability of the first answer token given all ``images`` (the confidence rule)."""
        enc = self.encode(images, text)
        self.counters.n_forward += 1
        logits = self.model(**self.model_inputs(enc), use_cache=False, logits_to_keep=1).logits[0, -1].float()
        return float(torch.softmax(logits, dim=-1).max())
