"""A tiny Qwen-style checkpoint directory (tokenizer + preprocessor), no downloads.

`build_tiny_checkpoint_files(out_dir)` writes the files that `transformers`
(`AutoTokenizer`, `AutoProcessor`) and our `Processor.from_pretrained` read from a
Qwen2.5-VL checkpoint: a byte-level BPE `tokenizer.json` with the Qwen pre-tokenizer
and special tokens, `tokenizer_config.json` + `chat_template.json` with the Qwen2.5-VL
chat template, and `preprocessor_config.json` (Qwen2VLImageProcessor, patch 14, merge
2, CLIP mean/std). With `family="qwen3_vl"` it writes a Qwen3-VL checkpoint's instead:
the Qwen3-VL chat template (no default system prompt; `thinking=True` for the
"Thinking" models' generation prompt, which opens `<think>`) and Qwen3-VL's
preprocessor (patch 16, mean/std 0.5, 65536..16777216 pixels). The vocabulary is trained
on a fixed in-code corpus (ASCII, the PAPO prompt, the synthetic task's words), so it is
deterministic and tiny (<= 512 ids): tiny models built on it have cheap embeddings.
"""

import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, trainers

# transformers' Qwen2Tokenizer pre-tokenizer regex (models/qwen2/tokenization_qwen2.py).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2/2.5/3-VL special tokens in their official order (ids 151643.. in the real vocab).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Added tokens that are not "special" in Qwen's tokenizer_config (they stay in decoded text).
QWEN_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)

# The Qwen2-VL / Qwen2.5-VL chat template (chat_template.json of the Hub repos).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The Qwen3-VL Instruct chat template's rendering of system, user and assistant turns (its
# tool-calling branches are left out): no default system prompt, images as
# <|vision_start|><|image_pad|><|vision_end|>, assistant turns as their text. A system
# message after the first is an error here (the Hub template drops it silently). The
# "Thinking" models' template differs in its generation prompt, which opens a <think> block.
_QWEN3_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and not loop.first %}"
    "{{- raise_exception('only the first message may be a system message') }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if message['role'] == 'user' and (content['type'] == 'image' or 'image' in content"
    " or 'image_url' in content) %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif message['role'] == 'user' and (content['type'] == 'video' or 'video' in content) %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Video ' ~ video_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
)
QWEN3_VL_CHAT_TEMPLATE = _QWEN3_VL_CHAT_TEMPLATE + (
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
QWEN3_VL_THINKING_CHAT_TEMPLATE = _QWEN3_VL_CHAT_TEMPLATE + (
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Text that tiny runs see all the time: weighted up so it encodes in few tokens.
_CORE_TEXT = (
  "system\nYou are a helpful assistant. user\n assistant\n "
  "You first think through the reasoning process as an internal monologue, enclosed within "
  "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}.\n\n"
  "How many red shapes are there in the image? How many green shapes are there in the image? "
  "How many blue shapes are there in the image? How many yellow shapes are there in the image? "
  "How many circles are there in the image? How many squares are there in the image? "
  "How many triangles are there in the image? What colour is the largest shape? "
  "What shape is the red object? What shape is the green object? What shape is the blue object? "
  "What shape is the yellow object? Is the circle left or right of the square? "
  "<think> The answer is </think> \\boxed{0} \\boxed{1} \\boxed{2} \\boxed{3} \\boxed{4} "
  "\\boxed{5} \\boxed{6} \\boxed{left} \\boxed{right} \\boxed{red} \\boxed{green} "
  "\\boxed{blue} \\boxed{yellow} \\boxed{circle} \\boxed{square} \\boxed{triangle} "
)
# General words and symbols so arbitrary prompts stay reasonably short.
_GENERAL_TEXT = (
  "the of and to in is it that for on with as at by this be from or which what when "
  "where who how why not all can has have had was were will would there their then "
  "than so if each more most many much some any number value angle area length point line "
  "triangle circle radius degree figure shown below above given find calculate equal sum "
  "Let us compute 1 + 2 = 3 , 4 - 1 = 3 ; x * y / z ( a ) [ b ] { c } < > ! ? : "
  "one two three four five six seven eight nine zero yes no "
)


def _training_corpus():
  """Deterministic in-code corpus; core text repeated so its words win the merges."""
  lines = [_CORE_TEXT] * 40 + [_GENERAL_TEXT] * 3
  lines += ["".join(chr(c) for c in range(32, 127))]
  return lines


def build_tokenizer(vocab_size=490):
  """Trains a byte-level BPE `tokenizers.Tokenizer` with Qwen's pipeline.

  The model/pre-tokenizer/normaliser/decoder match what transformers' Qwen2Tokenizer
  constructs, so loading through either `Qwen2Tokenizer` or `PreTrainedTokenizerFast`
  tokenises identically. Special tokens come last (as in Qwen's vocab).
  """
  tok = Tokenizer(models.BPE(
      unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
      fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
  tok.train_from_iterator(_training_corpus(), trainer=trainer)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED_TOKENS])
  return tok


def special_token_ids(tok):
  """dict of the ids a tiny model config needs (names as in Qwen2.5-VL's config.json)."""
  ids = {name: tok.token_to_id(t) for name, t in (
      ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
      ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
      ("vision_token_id", "<|vision_pad|>"), ("eos_token_id", "<|im_end|>"),
      ("pad_token_id", "<|endoftext|>"), ("bos_token_id", "<|endoftext|>"),
      ("im_start_token_id", "<|im_start|>"))}
  ids["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
  return ids


# family -> (processor class, image processor class, patch size, min/max pixels, mean, std), as on the Hub.
FAMILIES = {
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor", 14, 3136, 12845056, OPENAI_CLIP_MEAN,
                   OPENAI_CLIP_STD),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen2VLImageProcessorFast", 16, 65536, 16777216, (0.5, 0.5, 0.5),
                 (0.5, 0.5, 0.5)),
}


def _preprocessor_config(patch_size, temporal_patch_size, merge_size, min_pixels, max_pixels,
                         image_mean, image_std, family="qwen2_5_vl"):
  processor_class, image_processor_type = FAMILIES[family][:2]
  return {
      "image_processor_type": image_processor_type,
      "processor_class": processor_class,
      "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
      "resample": 3, "rescale_factor": 1 / 255,
      "image_mean": list(image_mean), "image_std": list(image_std),
      "patch_size": patch_size, "temporal_patch_size": temporal_patch_size,
      "merge_size": merge_size,
      "min_pixels": min_pixels, "max_pixels": max_pixels,
      "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
  }


def build_tiny_checkpoint_files(out_dir, *, min_pixels=None, max_pixels=None,
                                patch_size=None, temporal_patch_size=2, merge_size=2,
                                image_mean=None, image_std=None,
                                vocab_size=490, family="qwen2_5_vl", thinking=False):
  """Writes tokenizer + processor files of a tiny Qwen2.5-VL- or Qwen3-VL-style checkpoint.

  Files: tokenizer.json, tokenizer_config.json, chat_template.json,
  preprocessor_config.json (also read by AutoProcessor to find the processor class).
  Arguments left None take the family's Hub values (`FAMILIES`); `thinking` picks the
  Qwen3-VL "Thinking" chat template. The model's config.json / weights are someone
  else's job; feed them the returned ids.

  Returns:
    dict: image_token_id, video_token_id, vision_start_token_id, vision_end_token_id,
    vision_token_id, eos_token_id (<|im_end|>), pad_token_id and bos_token_id
    (<|endoftext|>), im_start_token_id, vocab_size (total ids, <= 512 by default).
  """
  if family not in FAMILIES:
    raise ValueError(f"family {family!r} is not one of {sorted(FAMILIES)}")
  if thinking and family != "qwen3_vl":
    raise ValueError("thinking=True is a Qwen3-VL chat template (family='qwen3_vl')")
  processor_class, _, d_patch, d_min, d_max, d_mean, d_std = FAMILIES[family]
  pick = lambda v, d: d if v is None else v
  if family == "qwen3_vl":
    template = QWEN3_VL_THINKING_CHAT_TEMPLATE if thinking else QWEN3_VL_CHAT_TEMPLATE
  else:
    template = QWEN2_VL_CHAT_TEMPLATE
  os.makedirs(out_dir, exist_ok=True)
  tok = build_tokenizer(vocab_size)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  added = {}
  for t in QWEN_SPECIAL_TOKENS + QWEN_ADDED_TOKENS:
    added[str(tok.token_to_id(t))] = {
        "content": t, "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": t in QWEN_SPECIAL_TOKENS}
  tokenizer_config = {
      "tokenizer_class": "Qwen2Tokenizer",
      "processor_class": processor_class,
      "added_tokens_decoder": added,
      "additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS[1:]],
      "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
      "unk_token": None, "errors": "replace", "split_special_tokens": False,
      "clean_up_tokenization_spaces": False, "model_max_length": 32768,
      "chat_template": template,
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(tokenizer_config, f, indent=2)
  with open(os.path.join(out_dir, "chat_template.json"), "w") as f:
    json.dump({"chat_template": template}, f, indent=2)
  with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
    json.dump(_preprocessor_config(pick(patch_size, d_patch), temporal_patch_size, merge_size,
                                   pick(min_pixels, d_min), pick(max_pixels, d_max),
                                   pick(image_mean, d_mean), pick(image_std, d_std), family), f, indent=2)
  return special_token_ids(tok)
