"""A byte-level BPE tokenizer trained on the spot, plus chat templates, for the tiny test models.

Nothing here downloads anything: the merges are learned in well under a second from a small built-in
English corpus, and the result is wrapped in transformers' own ``Qwen2Tokenizer`` class (the class the
real Qwen2-VL and VideoLLaMA3 checkpoints use), so the real processors accept it unchanged.
"""

from __future__ import annotations

import json

_CORPUS = """
The picture shows a small red house with a white door and two square windows. A tall green tree stands
next to the house, and the sun is shining in a clear blue sky. The ground is covered with short grass.
Describe the image. What is written here? What trend does the chart show? How many shapes can you see?
The bar chart compares the sales of four products over one year. The first bar is the highest, and the
last bar is the lowest, so the values decrease from left to right. The line chart shows a steady rise.
A yellow circle, a blue square and a green triangle are drawn on a gray background. The circle is on the
left, the square is in the middle and the triangle is on the right side of the picture.
The video shows a ball moving from the left edge to the right edge of the frame while the camera stays
still. In the first frame the ball is small; in the last frame it is larger and closer to the viewer.
The text in the image reads: "Open every day from nine to five." The letters are black on a white sign.
You are a helpful assistant. The user asks a question about an image or a video, and the assistant gives
a short, accurate answer. If the question cannot be answered from the picture, the assistant says so.
Mountains rise behind a quiet lake at sunset; the water reflects the orange and purple colors of the sky.
Three people walk along a street lined with shops, cars are parked on both sides, and a dog sits nearby.
The number of visitors grew from 120 in January to 450 in June, then fell slightly to 410 in July.
There are 7 apples, 3 oranges and 12 grapes on the table. The total count of fruit is 22 pieces.
Summarize the scene in one sentence. What color is the roof? Where is the sun? Is it day or night?
Quantization reduces the number of bits used to store each weight of a neural network, which makes the
model smaller and faster while keeping its answers close to the original ones.
"""

# Qwen2-VL's special tokens, in the order the real tokenizer numbers them (after the ordinary vocabulary).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Behaves like Qwen2-VL's template: default system turn, vision placeholders wrapped in vision_start/end,
# optional "Picture N:" / "Video N:" labels with add_vision_id.
QWEN2VL_CHAT_TEMPLATE = (
    "{%- set counts = namespace(image=0, video=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set counts.image = counts.image + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ counts.image ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{%- set counts.video = counts.video + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ counts.video ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Behaves like the converted VideoLLaMA3 ("-HF") template: no default system turn, bare pad placeholders
# followed by a newline (the processor expands a video into "Time t s:" groups of pad tokens).
VIDEOLLAMA3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|image_pad|>\\n' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|video_pad|>\\n' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def train_tiny_tokenizer(vocab_size: int = 640):
    """Train a byte-level BPE on the built-in corpus and wrap it as a ``Qwen2Tokenizer``.

    ``vocab_size`` counts the ordinary (trained) tokens including the 256 byte symbols; the special tokens
    of :data:`SPECIAL_TOKENS` are numbered right after them, as in the real Qwen2 tokenizer. Training is
    deterministic (same corpus, same settings, same merges).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    # Borrow the exact normalizer / pre-tokenizer / decoder pipeline of the real class.
    reference = Qwen2Tokenizer()._tokenizer
    raw = Tokenizer(models.BPE())
    raw.normalizer = reference.normalizer
    raw.pre_tokenizer = reference.pre_tokenizer
    raw.decoder = reference.decoder
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    raw.train_from_iterator(lines, trainer=trainer)

    vocab = dict(raw.get_vocab())
    merges = [tuple(pair) for pair in json.loads(raw.to_str())["model"]["merges"]]
    base = len(vocab)
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = base + offset
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS),
    )
