"""The final answer (Alg. 1's last step): from the whole image and the crops, each a real image
through the model's processor; generated, or by V*'s likelihood protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING

from PIL import Image

from egg_eval.data.prompts import split_options
from egg_eval.types import Box

if TYPE_CHECKING:
    from egg_eval.backbones.base import Backbone


def _view_images(backbone: Backbone, image: Image.Image, views: list[Box], features=None):
    whole = Box.of_image(*image.size)
    crops = [image if v == whole else image.crop(tuple(int(x) for x in v.as_list())) for v in views]
    if backbone.max_images is not None:
        crops = crops[: backbone.max_images]
        features = features[: backbone.max_images] if features is not None else None
    return crops, features


def answer_with_views(
    backbone: Backbone, image: Image.Image, question: str, views: list[Box], features=None, prefix=None
) -> str:
    """The answer from the whole image + crops, each a real image through the processor;
    ``features`` (per view, from grounding) spares the vision tower a second pass, ``prefix``
    (the whole image's grounding cache) the prefill of the prompt through the whole image."""
    crops, features = _view_images(backbone, image, views, features)
    return backbone.answer(crops, question, features=features, prefix=prefix)


def answer_by_likelihood(
    backbone: Backbone,
    image: Image.Image,
    question: str,
    views: list[Box],
    features=None,
    prefix=None,
    options: tuple[list[str], list[str]] | None = None,
) -> str:
    """V*'s official protocol on the given views: the letter of the option whose text has the
    lowest loss as the answer to the question stem. ``options`` ``(letters, texts)``: the
    options of ``question``, which is then the stem itself; else both are split from
    ``question``'s "(A) ..." lines."""
    stem, letters, texts = (question, *options) if options is not None else split_options(question)
    options = texts
    if not options:
        raise ValueError("likelihood protocol: no '(A) ...' option lines in the question")
    crops, features = _view_images(backbone, image, views, features)
    losses = backbone.option_losses(crops, stem, options, features=features, prefix=prefix)
    return letters[min(range(len(losses)), key=losses.__getitem__)]
