"""Tiny, randomly initialised checkpoints of the four REAL architectures.

They are built from config (no download), with an offline byte-level BPE tokenizer and
the architectures' own processor classes, and saved with ``save_pretrained`` so that
they load through exactly the same ``from_pretrained`` path users take with the 7B
checkpoints. Tests use them; so does the offline built-in default.

    python -c "from egg_eval.backbones.tiny import save_tiny; save_tiny('qwen25vl', '/tmp/q')"
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLImageProcessorPil,
)

from egg_eval.backbones.processors import InternVLImageOnlyProcessor, Qwen2_5_VLImageOnlyProcessor

SPECIAL = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}
EXTRA = {
    "image_token": "<image>",
    "video_token": "<video>",
    "qwen_image_pad": "<|image_pad|>",
    "qwen_video_pad": "<|video_pad|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
}

_CORPUS = [
    "USER: ASSISTANT: [INST] [/INST] system user assistant You are a helpful assistant.",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "What is the digit in the red green blue yellow square? yes no",
    "What is the sum of the digits in the squares? Is there a cat dog car in the image?",
    "(A) (B) (C) (D) A B C D 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18",
    "the a an of in on at to is are what which where who how many color left right top bottom",
]

# Chat templates with the structure of the real checkpoints' templates (images first,
# then the text, then the assistant turn), enough for the processors to expand images.
_TEMPLATES = {
    "llava15": (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
        "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
        "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    "llava16": (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
        "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} [/INST]"
        "{% else %} {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    ),
    "qwen25vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "internvl35": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}

FAMILIES = tuple(_TEMPLATES)


def build_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE trained on a fixed corpus, with every family's special tokens."""
    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL.values()) + list(EXTRA.values())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL, extra_special_tokens=EXTRA)


def _text_kw(tokenizer: PreTrainedTokenizerFast, hidden: int) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def _clip(image_size: int, hidden: int = 32) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
        projection_dim=hidden,
    )


def build(family: str, tok: PreTrainedTokenizerFast, *, vision: dict, text: dict, image: dict, text_class=None):
    """``(config, model class, processor)`` of ``family`` at the given sizes, wired to ``tok``
    (its chat template, special-token ids and the family's own processor classes). One
    place for the wiring, used by the tiny test models and by ``scripts/bench.py``'s
    published 7B/8B configurations. ``vision`` / ``text``: the towers' config kwargs;
    ``image``: the processor's settings (llava: side; llava16: + pinpoints; qwen: min/max
    pixels; internvl: tile, max_patches, seq_length); ``text_class``: InternVL's LM config."""
    tok.chat_template = _TEMPLATES[family]
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    text = {**ids, **text}
    llava_proc = dict(
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    if family in ("llava15", "llava16"):
        side = image["side"]
        common = dict(
            vision_config=CLIPVisionConfig(**vision),
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        square = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        if family == "llava15":
            cfg = LlavaConfig(text_config=LlamaConfig(**text), **common)
            ip = CLIPImageProcessorPil(**square)
            return cfg, LlavaForConditionalGeneration, LlavaProcessor(image_processor=ip, **llava_proc)
        pin = image["pinpoints"]
        cfg = LlavaNextConfig(text_config=MistralConfig(**text), image_grid_pinpoints=pin, **common)
        ip = LlavaNextImageProcessorPil(**square, image_grid_pinpoints=pin)
        return (
            cfg,
            LlavaNextForConditionalGeneration,
            LlavaNextProcessor(image_processor=ip, **llava_proc),
        )
    if family == "qwen25vl":
        cfg = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        )
        ip = Qwen2VLImageProcessorPil(
            size={"shortest_edge": image["min_pixels"], "longest_edge": image["max_pixels"]},
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
        )
        tok.add_special_tokens({})
        tok.image_token = "<|image_pad|>"
        tok.video_token = "<|video_pad|>"
        proc = Qwen2_5_VLImageOnlyProcessor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
        return cfg, Qwen2_5_VLForConditionalGeneration, proc
    if family == "internvl35":
        tile = image["tile"]
        cfg = InternVLConfig(
            vision_config={**vision, "image_size": [tile, tile], "patch_size": [14, 14], "use_mask_token": False},
            text_config=(text_class or Qwen2Config)(**text).to_dict(),
            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        ip = GotOcr2ImageProcessorPil(
            size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1, max_patches=image["max_patches"]
        )
        proc = InternVLImageOnlyProcessor(
            image_processor=ip, tokenizer=tok, image_seq_length=image["seq_length"], chat_template=tok.chat_template
        )
        return cfg, InternVLForConditionalGeneration, proc
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def _tiny_sizes(family: str, tok: PreTrainedTokenizerFast, hidden: int) -> dict:
    text = _text_kw(tok, hidden)
    if family == "llava15":  # 112 px, 14 px patches: an 8x8 grid of visual tokens over the centre crop
        return dict(vision=_clip(112), text=text, image={"side": 112})
    if family == "llava16":
        pin = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]
        # Mistral-7B-Instruct-v0.2, as the published checkpoint: no sliding window (MistralConfig's
        # default is 4096; tests/test_refine.py sets one where it tests one)
        text.update(sliding_window=None)
        return dict(vision=_clip(56), text=text, image={"side": 56, "pinpoints": pin})
    if family == "qwen25vl":
        text.update(num_attention_heads=2, num_key_value_heads=2, rope_scaling=None)
        # mrope sections must add up to head_dim / 2
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        assert sum(text["rope_parameters"]["mrope_section"]) == hidden // 2 // 2
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        return dict(vision=vision, text=text, image={"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64})
    if family == "internvl35":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        return dict(vision=vision, text=text, image={"tile": 112, "max_patches": 6, "seq_length": 16})
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def tiny_model_and_processor(family: str, seed: int = 0, hidden: int = 32):
    """Return ``(model, processor)`` of a tiny random ``family`` model (eval mode, float32)."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    cfg, model_class, proc = build(family, tok, **_tiny_sizes(family, tok, hidden))
    model = model_class(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval(), proc


def save_tiny(family: str, path: str | Path, seed: int = 0) -> Path:
    """Build a tiny ``family`` checkpoint and ``save_pretrained`` model + processor into ``path``."""
    path = Path(path)
    model, proc = tiny_model_and_processor(family, seed=seed)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path
