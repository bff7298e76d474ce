"""The methods a run can use, by name (``method=egg``, ``method=vanilla``): a small registered
class each, built from its config group's values, that answers one image and prompt on a
backbone and returns the answer and a :class:`~egg_eval.types.Trace` (its views, crops and
boxes). The CLI knows none of them by name; a new method registers itself here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from PIL import Image

from egg_eval.data.prompts import split_options
from egg_eval.grounding.answer import answer_by_likelihood, answer_with_views
from egg_eval.grounding.regions import RegionParams
from egg_eval.grounding.settings import EggConfig, ExecutionConfig
from egg_eval.types import Trace


class Method:
    """One method. ``from_config`` checks and holds its settings (no model needed: a bad value
    is refused before the weights load); ``bind`` gives the callable the runner calls per sample."""

    name: ClassVar[str]
    layer: int | None = None  # the logit-lens layer it reads, checked against the checkpoint

    @classmethod
    def from_config(cls, method: Mapping, stopping: Mapping, execution: ExecutionConfig) -> Method:
        raise NotImplementedError

    def run_id(self, protocol: str) -> str:
        """The run folder's name: the settings its records depend on."""
        raise NotImplementedError

    def answer(self, backbone: Any, image: Image.Image, question: str, answer: Callable[..., str]) -> tuple[str, Trace]:
        raise NotImplementedError

    def bind(self, backbone: Any, protocol: str = "generate") -> Callable[[Image.Image, str], tuple[str, Trace]]:
        """``(image, prompt) -> (answer, trace)`` on ``backbone``: generated, or under
        ``protocol="likelihood"`` the option of the prompt's "(A) ..." lines with the lowest
        loss after its stem, which is then the question the method works on (the model is asked
        the stem alone)."""
        if self.layer is not None:
            backbone.check_layer(self.layer)

        def run(image: Image.Image, prompt: str) -> tuple[str, Trace]:
            if protocol == "likelihood":
                stem, letters, texts = split_options(prompt)
                return self.answer(
                    backbone, image, stem, functools.partial(answer_by_likelihood, options=(letters, texts))
                )
            return self.answer(backbone, image, prompt, answer_with_views)

        return run


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


@register
class Vanilla(Method):
    """The plain model, the whole image only."""

    name = "vanilla"

    @classmethod
    def from_config(cls, method: Mapping, stopping: Mapping, execution: ExecutionConfig) -> Vanilla:
        return cls()

    def run_id(self, protocol: str) -> str:
        return "vanilla" + ("_likelihood" if protocol == "likelihood" else "")

    def answer(self, backbone, image, question, answer):
        from egg_eval.grounding.refine import run_vanilla

        return run_vanilla(backbone, image, question, answer=answer)


@register
class Egg(Method):
    """Entropy-Gradient Grounding (Alg. 1, then the answer from the whole image and the crops)."""

    name = "egg"

    def __init__(self, config: EggConfig, execution: ExecutionConfig):
        self.config, self.execution, self.layer = config, execution, config.layer

    @classmethod
    def from_config(cls, method: Mapping, stopping: Mapping, execution: ExecutionConfig) -> Egg:
        m, s = method, stopping
        regions = RegionParams(sigma=m["sigma"], top_k=m["top_k"], max_aspect=m["max_aspect"], min_size=m["min_size"])
        config = EggConfig(
            objective=m["objective"],
            token_index=m["token_index"],
            layer=m["layer"],
            regions=regions,
            stopping=s["name"],
            n_rounds=1 if s.get("n") is None else s["n"],
            max_rounds=m["max_rounds"],
        )
        return cls(config, execution)

    def run_id(self, protocol: str) -> str:
        c, r = self.config, self.config.regions
        layer = "last" if c.layer is None else c.layer
        stop = c.stopping if c.stopping != "fixed" else f"fixed{c.n_rounds}"
        suffix = "_likelihood" if protocol == "likelihood" else ""
        return f"egg_{c.objective}_k{r.top_k}_L{layer}_t{c.token_index}_s{r.sigma}_{stop}{suffix}"

    def answer(self, backbone, image, question, answer):
        from egg_eval.grounding.refine import run_egg

        return run_egg(backbone, image, question, self.config, answer=answer, execution=self.execution)
