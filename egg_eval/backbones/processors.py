"""Image-only variants of the Qwen2.5-VL and InternVL processors.

The stock processors build a video processor, and without torchvision (which we must
not install, see REFERENCE.md) that fails with ``VIDEO_PROCESSOR_MAPPING has no
attribute _extra_content``. Leaving ``video_processor`` out of ``__init__`` makes
``ProcessorMixin`` neither build nor load one; everything image-related is inherited
unchanged, and ``from_pretrained`` reads the same files a stock checkpoint ships.
"""

from __future__ import annotations

from transformers import InternVLProcessor, Qwen2_5_VLProcessor


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class InternVLImageOnlyProcessor(InternVLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        super().__init__(
            image_processor, tokenizer, None, image_seq_length=image_seq_length, chat_template=chat_template, **kwargs
        )
