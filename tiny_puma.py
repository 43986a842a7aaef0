# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Writes randomly initialised Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints offline, laid out like the real ones.

A checkpoint folder holds the Hub's `config.json` of the family (flat text fields for Qwen2-VL and Qwen2.5-VL, nested
for Qwen3-VL), safetensors weights (one file or shards with `model.safetensors.index.json`) in one of the key layouts
real checkpoints use, and, for the tiny shape, a byte-level BPE tokenizer trained on the fly with the family's
special tokens plus the family's real processor and chat template. Nothing here is pretrained: the weights are random.

    python tiny_puma.py OUT_DIR [--family qwen2_vl|qwen2_5_vl|qwen3_vl] [--layout old|new|base] [--shards N]
                                   [--shape tiny|tiny64|small|2b|8b] [--dtype bfloat16]

Layouts: "old" is transformers <= 4.51's (`model.layers.N`, `visual.*`; Qwen/Qwen2-VL-* and Qwen2.5-VL-* are
published so), "new" is >= 4.52's (`model.language_model.*`, `model.visual.*`; Qwen3-VL and Qwen3-VL-Embedding), "base"
is a saved base model's (`language_model.*`, `visual.*`).
"""

import argparse
import json
import os
import re
import zlib

import torch
from safetensors.torch import save_file

from modeling_puma import holds_fused_experts_transposed


FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
LAYOUTS = ("old", "new", "base")
HUB_LAYOUT = {"qwen2_vl": "old", "qwen2_5_vl": "old", "qwen3_vl": "new", "qwen3_vl_moe": "new"}
GENERATION_CLASS = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                    "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}

QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
# Qwen2.5-VL and Qwen3 tokenizers add the tool-call and code-completion tokens (Qwen3 also <think>/</think>).
QWEN2_5_VL_SPECIAL_TOKENS = QWEN2_VL_SPECIAL_TOKENS + [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
QWEN3_VL_SPECIAL_TOKENS = QWEN2_5_VL_SPECIAL_TOKENS + ["<tool_response>", "</tool_response>", "<think>", "</think>"]
SPECIAL_TOKENS = {"qwen2_vl": QWEN2_VL_SPECIAL_TOKENS, "qwen2_5_vl": QWEN2_5_VL_SPECIAL_TOKENS,
                  "qwen3_vl": QWEN3_VL_SPECIAL_TOKENS, "qwen3_vl_moe": QWEN3_VL_SPECIAL_TOKENS}

# Qwen/Qwen2-VL-7B-Instruct's chat template.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
# Qwen/Qwen2.5-VL-7B-Instruct's chat template.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    'You are a helpful assistant.<|im_end|>\n'
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    '{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n'
    '{% endif %}'
)

# Qwen/Qwen3-VL-*-Instruct's chat template (no default system turn).
QWEN3_VL_CHAT_TEMPLATE = (
    '{%- if tools %}\n'
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    '        {%- if messages[0].content is string %}\n'
    '            {{- messages[0].content }}\n'
    '        {%- else %}\n'
    '            {%- for content in messages[0].content %}\n'
    "                {%- if 'text' in content %}\n"
    '                    {{- content.text }}\n'
    '                {%- endif %}\n'
    '            {%- endfor %}\n'
    '        {%- endif %}\n'
    "        {{- '\\n\\n' }}\n"
    '    {%- endif %}\n'
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n'
    '        {{- tool | tojson }}\n'
    '    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    '{%- else %}\n'
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' }}\n"
    '        {%- if messages[0].content is string %}\n'
    '            {{- messages[0].content }}\n'
    '        {%- else %}\n'
    '            {%- for content in messages[0].content %}\n'
    "                {%- if 'text' in content %}\n"
    '                    {{- content.text }}\n'
    '                {%- endif %}\n'
    '            {%- endfor %}\n'
    '        {%- endif %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- set image_count = namespace(value=0) %}\n'
    '{%- set video_count = namespace(value=0) %}\n'
    '{%- for message in messages %}\n'
    '    {%- if message.role == "user" %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n"
    '        {%- if message.content is string %}\n'
    '            {{- message.content }}\n'
    '        {%- else %}\n'
    '            {%- for content in message.content %}\n'
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    '                    {%- set image_count.value = image_count.value + 1 %}\n'
    '                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n'
    '                    <|vision_start|><|image_pad|><|vision_end|>\n'
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    '                    {%- set video_count.value = video_count.value + 1 %}\n'
    '                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n'
    '                    <|vision_start|><|video_pad|><|vision_end|>\n'
    "                {%- elif 'text' in content %}\n"
    '                    {{- content.text }}\n'
    '                {%- endif %}\n'
    '            {%- endfor %}\n'
    '        {%- endif %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n"
    '        {%- if message.content is string %}\n'
    '            {{- message.content }}\n'
    '        {%- else %}\n'
    '            {%- for content_item in message.content %}\n'
    "                {%- if 'text' in content_item %}\n"
    '                    {{- content_item.text }}\n'
    '                {%- endif %}\n'
    '            {%- endfor %}\n'
    '        {%- endif %}\n'
    '        {%- if message.tool_calls %}\n'
    '            {%- for tool_call in message.tool_calls %}\n'
    '                {%- if (loop.first and message.content) or (not loop.first) %}\n'
    "                    {{- '\\n' }}\n"
    '                {%- endif %}\n'
    '                {%- if tool_call.function %}\n'
    '                    {%- set tool_call = tool_call.function %}\n'
    '                {%- endif %}\n'
    '                {{- \'<tool_call>\\n{"name": "\' }}\n'
    '                {{- tool_call.name }}\n'
    '                {{- \'", "arguments": \' }}\n'
    '                {%- if tool_call.arguments is string %}\n'
    '                    {{- tool_call.arguments }}\n'
    '                {%- else %}\n'
    '                    {{- tool_call.arguments | tojson }}\n'
    '                {%- endif %}\n'
    "                {{- '}\\n</tool_call>' }}\n"
    '            {%- endfor %}\n'
    '        {%- endif %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    '        {%- endif %}\n'
    "        {{- '\\n<tool_response>\\n' }}\n"
    '        {%- if message.content is string %}\n'
    '            {{- message.content }}\n'
    '        {%- else %}\n'
    '            {%- for content in message.content %}\n'
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    '                    {%- set image_count.value = image_count.value + 1 %}\n'
    '                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n'
    '                    <|vision_start|><|image_pad|><|vision_end|>\n'
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    '                    {%- set video_count.value = video_count.value + 1 %}\n'
    '                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n'
    '                    <|vision_start|><|video_pad|><|vision_end|>\n'
    "                {%- elif 'text' in content %}\n"
    '                    {{- content.text }}\n'
    '                {%- endif %}\n'
    '            {%- endfor %}\n'
    '        {%- endif %}\n'
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    '        {%- endif %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|im_start|>assistant\\n' }}\n"
    '{%- endif %}\n'
)

# Qwen/Qwen3-VL-Embedding's chat template: Qwen3-VL's, with the default system turn "Represent the user's input."
QWEN3_VL_EMBEDDING_CHAT_TEMPLATE = (
    "{%- set default_system_message = 'Represent the user\\'s input.' -%}\n"
    '{%- if tools %}\n'
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    '        {%- if messages[0].content is string %}\n'
    '            {{- messages[0].content }}\n'
    '        {%- else %}\n'
    '            {%- for content in messages[0].content %}\n'
    "                {%- if 'text' in content %}\n"
    '                    {{- content.text }}\n'
    '                {%- endif %}\n'
    '            {%- endfor %}\n'
    '        {%- endif %}\n'
    "        {{- '\\n\\n' }}\n"
    '    {%- else %}\n'
    "        {{- default_system_message + '\\n\\n' }}\n"
    '    {%- endif %}\n'
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n'
    '        {{- tool | tojson }}\n'
    '    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    '{%- else %}\n'
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' }}\n"
    '        {%- if messages[0].content is string %}\n'
    '            {{- messages[0].content }}\n'
    '        {%- else %}\n'
    '            {%- for content in messages[0].content %}\n'
    "                {%- if 'text' in content %}\n"
    '                    {{- content.text }}\n'
    '                {%- endif %}\n'
    '            {%- endfor %}\n'
    '        {%- endif %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- else %}\n'
    "        {{- '<|im_start|>system\\n' + default_system_message + '<|im_end|>\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- set image_count = namespace(value=0) %}\n'
    '{%- set video_count = namespace(value=0) %}\n'
    '{%- for message in messages %}\n'
    '    {%- if message.role == "user" %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n"
    '        {%- if message.content is string %}\n'
    '            {{- message.content }}\n'
    '        {%- else %}\n'
    '            {%- for content in message.content %}\n'
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    '                    {%- set image_count.value = image_count.value + 1 %}\n'
    '                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n'
    '                    <|vision_start|><|image_pad|><|vision_end|>\n'
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    '                    {%- set video_count.value = video_count.value + 1 %}\n'
    '                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n'
    '                    <|vision_start|><|video_pad|><|vision_end|>\n'
    "                {%- elif 'text' in content %}\n"
    '                    {{- content.text }}\n'
    '                {%- endif %}\n'
    '            {%- endfor %}\n'
    '        {%- endif %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n"
    '        {%- if message.content is string %}\n'
    '            {{- message.content }}\n'
    '        {%- else %}\n'
    '            {%- for content_item in message.content %}\n'
    "                {%- if 'text' in content_item %}\n"
    '                    {{- content_item.text }}\n'
    '                {%- endif %}\n'
    '            {%- endfor %}\n'
    '        {%- endif %}\n'
    '        {%- if message.tool_calls %}\n'
    '            {%- for tool_call in message.tool_calls %}\n'
    '                {%- if (loop.first and message.content) or (not loop.first) %}\n'
    "                    {{- '\\n' }}\n"
    '                {%- endif %}\n'
    '                {%- if tool_call.function %}\n'
    '                    {%- set tool_call = tool_call.function %}\n'
    '                {%- endif %}\n'
    '                {{- \'<tool_call>\\n{"name": "\' }}\n'
    '                {{- tool_call.name }}\n'
    '                {{- \'", "arguments": \' }}\n'
    '                {%- if tool_call.arguments is string %}\n'
    '                    {{- tool_call.arguments }}\n'
    '                {%- else %}\n'
    '                    {{- tool_call.arguments | tojson }}\n'
    '                {%- endif %}\n'
    "                {{- '}\\n</tool_call>' }}\n"
    '            {%- endfor %}\n'
    '        {%- endif %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    '        {%- endif %}\n'
    "        {{- '\\n<tool_response>\\n' }}\n"
    '        {%- if message.content is string %}\n'
    '            {{- message.content }}\n'
    '        {%- else %}\n'
    '            {%- for content in message.content %}\n'
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    '                    {%- set image_count.value = image_count.value + 1 %}\n'
    '                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n'
    '                    <|vision_start|><|image_pad|><|vision_end|>\n'
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    '                    {%- set video_count.value = video_count.value + 1 %}\n'
    '                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n'
    '                    <|vision_start|><|video_pad|><|vision_end|>\n'
    "                {%- elif 'text' in content %}\n"
    '                    {{- content.text }}\n'
    '                {%- endif %}\n'
    '            {%- endfor %}\n'
    '        {%- endif %}\n'
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    '        {%- endif %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|im_start|>assistant\\n' }}\n"
    '{%- endif %}\n'
)
CHAT_TEMPLATES = {"qwen2_vl": QWEN2_VL_CHAT_TEMPLATE, "qwen2_5_vl": QWEN2_5_VL_CHAT_TEMPLATE,
                  "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE, "qwen3_vl_moe": QWEN3_VL_CHAT_TEMPLATE}

# Shapes: text config (flat, as in the Hub's config.json) and vision config, per family.
_QWEN2_VISION_TINY = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2)
SHAPES = {
    "qwen2_vl": {
        "tiny": {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                              num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                              tie_word_embeddings=True),
                 "vision": _QWEN2_VISION_TINY},
        # tiny but not trivial: 28 layers like the 7B, so k=12 keeps the release's depth ratio (benchmarks)
        "small": {"text": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=28, num_attention_heads=6,
                               num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
                               tie_word_embeddings=True),
                  "vision": dict(depth=4, embed_dim=192, hidden_size=384, mlp_ratio=4, num_heads=4)},
        # Qwen/Qwen2-VL-2B-Instruct
        "2b": {"text": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                            num_key_value_heads=2, vocab_size=151936,
                            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, tie_word_embeddings=True),
               "vision": dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16)},
    },
    "qwen2_5_vl": {
        "tiny": {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                              num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                              tie_word_embeddings=True),
                 "vision": dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                fullatt_block_indexes=[1, 3], window_size=56, tokens_per_second=2,
                                hidden_act="silu")},
        # Qwen/Qwen2.5-VL-3B-Instruct (the smallest Qwen2.5-VL)
        "2b": {"text": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                            num_key_value_heads=2, vocab_size=151936,
                            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, tie_word_embeddings=True),
               "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                              fullatt_block_indexes=[7, 15, 23, 31], window_size=112, tokens_per_second=2,
                              hidden_act="silu")},
    },
    "qwen3_vl": {
        # three DeepStack injections (after decoder layers 0, 1, 2) so that pruning to 1..6 layers covers k below,
        # at and above their number
        "tiny": {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16,
                              rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2],
                                            "mrope_interleaved": True},
                              tie_word_embeddings=True),
                 "vision": dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2],
                                hidden_act="gelu_pytorch_tanh")},
        # Qwen/Qwen3-VL-2B-Instruct and Qwen/Qwen3-VL-Embedding-2B
        "2b": {"text": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, vocab_size=151936,
                            rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True},
                            tie_word_embeddings=True),
               "vision": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                              num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
                              hidden_act="gelu_pytorch_tanh")},
        # Qwen/Qwen3-VL-8B-Instruct and Qwen/Qwen3-VL-Embedding-8B
        "8b": {"text": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, vocab_size=151936,
                            rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True},
                            tie_word_embeddings=False),
               "vision": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                              num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
                              hidden_act="gelu_pytorch_tanh")},
    },
}
# Qwen3-VL-MoE (Qwen/Qwen3-VL-30B-A3B-Instruct in small): every layer sparse but layer 1, so that pruning must keep
# each layer's kind
SHAPES["qwen3_vl_moe"] = {"tiny": {
    "text": dict(SHAPES["qwen3_vl"]["tiny"]["text"], moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                 decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True),
    "vision": dict(SHAPES["qwen3_vl"]["tiny"]["vision"])}}
# "tiny64": the smallest shapes vLLM's CPU attention runs (head sizes 32, 64, 80, ... 512; "tiny" has 16): text width
# 128 in 2 heads of 64, 4 layers, vision heads of 32; Qwen3-VL injects DeepStack features after layers 0 and 1.
_TEXT_TINY64 = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                    num_key_value_heads=2, tie_word_embeddings=True)
SHAPES["qwen2_vl"]["tiny64"] = {
    "text": dict(_TEXT_TINY64, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}),
    "vision": dict(depth=2, embed_dim=64, hidden_size=128, mlp_ratio=2, num_heads=2)}
SHAPES["qwen2_5_vl"]["tiny64"] = {
    "text": dict(_TEXT_TINY64, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}),
    "vision": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                   fullatt_block_indexes=[1], window_size=56, tokens_per_second=2, hidden_act="silu")}
SHAPES["qwen3_vl"]["tiny64"] = {
    "text": dict(_TEXT_TINY64, head_dim=64, rope_scaling={"rope_type": "default", "mrope_section": [12, 10, 10],
                                                          "mrope_interleaved": True}),
    "vision": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                   num_position_embeddings=64, deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh")}
PATCH_SIZE = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_vl_moe": 16}
ROPE_THETA = {"qwen2_vl": 1000000.0, "qwen2_5_vl": 1000000.0, "qwen3_vl": 5000000.0, "qwen3_vl_moe": 5000000.0}

TINY_CORPUS = [
    "a red circle on a white background", "two blue squares next to a green triangle", "a small yellow star",
    "the same object but red", "find an image that matches the caption", "retrieve a sentence that answers the question",
    "a photo of a dog running on the beach", "what is shown in this picture", "a large purple hexagon at the top left",
    "Summarize above image in one word:", "Summarize above sentence in one word:",
    "Summarize above image and sentence in one word:", "You are a helpful assistant.",
    "Represent the user's input.", "three orange diamonds in a row", "an empty grey canvas",
    "the quick brown fox jumps over the lazy dog", "A man is playing a guitar.", "Two women are walking in the park.",
    "There is a cat sitting on the mat.", "Find me an everyday image that matches the given caption.",
    "Retrieve a passage that provides an answer.",
]


def tiny_tokenizer(family: str = "qwen2_vl", vocab_size: int = 400, append_end_token: bool = False):
    """A byte-level BPE tokenizer trained now on a small corpus, with the family's special tokens appended.

    `append_end_token`: the tokenizer appends `<|endoftext|>` to every encoding made with special tokens (as
    Qwen3-VL-Embedding's does, so that its last-token pooling reads that token)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(TINY_CORPUS * 4, trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS[family])
    if append_end_token:
        end = ("<|endoftext|>", tokenizer.token_to_id("<|endoftext|>"))
        tokenizer.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                                 pair="$A $B <|endoftext|>", special_tokens=[end])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="right",
        model_max_length=32768, clean_up_tokenization_spaces=False,
    )


def save_tiny_processor(out_dir: str, family: str = "qwen2_vl", min_pixels: int | None = None,
                        max_pixels: int | None = None, embedder: str | None = None):
    """Saves the family's real processor around the tiny tokenizer; returns the special-token ids for the config and
    the tokenizer's length. `embedder="qwen3_vl_embedding"` gives Qwen3-VL-Embedding's chat template and tokenizer."""
    import transformers
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = tiny_tokenizer(family, append_end_token=embedder == "qwen3_vl_embedding")
    tokenizer.save_pretrained(out_dir)
    # Name the class real Qwen checkpoints name, so AutoTokenizer and the processor's type check accept it.
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    tokenizer_config["tokenizer_class"] = "Qwen2Tokenizer"
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)
    factor = PATCH_SIZE[family] * 2
    min_pixels = min_pixels if min_pixels is not None else 4 * factor * factor
    max_pixels = max_pixels if max_pixels is not None else 16 * factor * factor
    image_kwargs = dict(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=PATCH_SIZE[family])
    if family.startswith("qwen3_vl"):
        image_kwargs.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        video_processor = transformers.Qwen3VLVideoProcessor(patch_size=16)
    else:
        video_processor = transformers.Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    processor_class = getattr(transformers, {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                                             "qwen3_vl": "Qwen3VLProcessor", "qwen3_vl_moe": "Qwen3VLProcessor"}[family])
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(**image_kwargs),
        tokenizer=AutoTokenizer.from_pretrained(out_dir),
        video_processor=video_processor,
        chat_template=QWEN3_VL_EMBEDDING_CHAT_TEMPLATE if embedder == "qwen3_vl_embedding" else CHAT_TEMPLATES[family],
    )
    processor.save_pretrained(out_dir)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("bos_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>"), ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"), ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>")]}
    if family == "qwen2_vl":
        ids["vision_token_id"] = tokenizer.convert_tokens_to_ids("<|vision_pad|>")
    return ids, len(tokenizer)


def hub_config(family: str = "qwen2_vl", shape: str = "tiny", dtype: str = "float32", token_ids: dict | None = None,
               vocab_size: int | None = None, num_hidden_layers: int | None = None, nested: bool | None = None) -> dict:
    """A `config.json` dict as the Hub holds it: flat text fields (Qwen2-VL, Qwen2.5-VL) or a nested `text_config`
    (Qwen3-VL, and any family saved by transformers >= 4.52: `nested=True`)."""
    spec = SHAPES[family][shape]
    text = dict(spec["text"])
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    if num_hidden_layers is not None:
        text["num_hidden_layers"] = num_hidden_layers
    text.update(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=ROPE_THETA[family],
                attention_dropout=0.0, initializer_range=0.02, use_cache=True)
    if not family.startswith("qwen3_vl"):
        text.update(use_sliding_window=False, sliding_window=32768, max_window_layers=text["num_hidden_layers"])
    vision = dict(spec["vision"], in_chans=3, in_channels=3, patch_size=PATCH_SIZE[family], spatial_patch_size=PATCH_SIZE[family],
                  spatial_merge_size=2, temporal_patch_size=2)
    if family.startswith("qwen3_vl"):
        vision.pop("in_chans")
        vision.pop("spatial_patch_size")
    ids = dict(token_ids or {"bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
                             "vision_end_token_id": 151653, "image_token_id": 151655, "video_token_id": 151656})
    config = {"architectures": [GENERATION_CLASS[family]], "model_type": family, "torch_dtype": dtype,
              "transformers_version": "4.57.0" if family.startswith("qwen3_vl") else "4.41.2",
              "vision_config": dict(vision, model_type=family) if family.startswith("qwen3_vl") else vision}
    nested = family.startswith("qwen3_vl") if nested is None else nested
    text_ids = {k: ids.pop(k) for k in ("bos_token_id", "eos_token_id")}
    config.update(ids)
    if nested:
        config["tie_word_embeddings"] = text["tie_word_embeddings"]
        config["text_config"] = dict(text, model_type=f"{family}_text", **text_ids)
    else:
        config.update(text, **text_ids)
    return config


def parameter_shapes(config: dict) -> dict[str, torch.Size]:
    """Tensor names (transformers' in-memory layout) and shapes of the family's generation model for `config`."""
    import transformers

    family = config["model_type"]
    config_class = getattr(transformers, {"qwen2_vl": "Qwen2VLConfig", "qwen2_5_vl": "Qwen2_5_VLConfig",
                                          "qwen3_vl": "Qwen3VLConfig", "qwen3_vl_moe": "Qwen3VLMoeConfig"}[family])
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
    with torch.device("meta"):
        model = getattr(transformers, GENERATION_CLASS[family])(config_class(**config))
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings or getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)  # tied checkpoints on the Hub do not store lm_head
    if family == "qwen3_vl_moe" and holds_fused_experts_transposed():
        # the checkpoint holds them as the Hub's do
        shapes = {name: shape[:1] + shape[1:][::-1] if re.search(r"mlp\.experts\.(gate_up|down)_proj$", name) else shape
                  for name, shape in shapes.items()}
    return shapes


def checkpoint_key(name: str, layout: str) -> str:
    """Maps an in-memory tensor name to its name in a checkpoint of the given layout."""
    if layout == "old":
        if name.startswith("model.language_model."):
            return "model." + name[len("model.language_model."):]
        if name.startswith("model.visual."):
            return name[len("model."):]
    if layout == "base" and name.startswith("model."):
        return name[len("model."):]
    return name


def random_tensor(name: str, shape: torch.Size, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic per-name random values; norm weights near 1, matrices scaled by 1/sqrt(fan_in)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    values = torch.randn(shape, generator=generator)
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    if name.endswith(".bias"):
        values *= 0.02
    elif "norm" in leaf or leaf in ("ln_q",):
        values = 1.0 + 0.1 * values
    elif len(shape) >= 2 and "embed_tokens" not in name and "pos_embed" not in name:
        values /= (torch.tensor(shape[1:]).prod().float().sqrt())
    return values.to(dtype)


def write_random_checkpoint(out_dir: str, config: dict, layout: str = "old", num_shards: int = 1, seed: int = 0,
                            dtype: torch.dtype = torch.float32) -> list[str]:
    """Writes `config.json` and random weights in `layout`, split into `num_shards` safetensors files."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    shapes = parameter_shapes(config)
    if layout == "base":
        shapes.pop("lm_head.weight", None)  # a base model has no LM head
    names = list(shapes)
    sizes = [shapes[n].numel() for n in names]
    budget = sum(sizes) / num_shards
    groups, current, filled = [], [], 0
    for name, size in zip(names, sizes):
        if current and filled + size > budget and len(groups) < num_shards - 1:
            groups.append(current)
            current, filled = [], 0
        current.append(name)
        filled += size
    groups.append(current)
    files, weight_map, total = [], {}, 0
    for i, group in enumerate(groups):
        filename = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {checkpoint_key(n, layout): random_tensor(n, shapes[n], seed, dtype) for n in group}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, os.path.join(out_dir, filename), metadata={"format": "pt"})
        weight_map.update({key: filename for key in tensors})
        files.append(filename)
        del tensors
    if len(groups) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files


EMBEDDERS = {"qwen3_vl_embedding": "qwen3_vl", "gme": "qwen2_vl"}


def build_tiny_checkpoint(out_dir: str, family: str = "qwen2_vl", layout: str | None = None, num_shards: int = 1,
                          seed: int = 0, num_hidden_layers: int | None = None, dtype: torch.dtype = torch.float32,
                          max_pixels: int | None = None, embedder: str | None = None, shape: str = "tiny") -> str:
    """A complete tiny checkpoint folder of `family` (config, weights, tokenizer, processor); returns `out_dir`.

    `layout` defaults to the one the family's Hub checkpoints use. `embedder` ("qwen3_vl_embedding" or "gme") lays it
    out like that trained embedder: its family, chat template and tokenizer, and GME's `gme_inference.py`. `shape`:
    "tiny", or "tiny64" (heads of 64, which vLLM's CPU attention runs)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
    tiny_shapes = [name for name in ("tiny", "tiny64") if name in SHAPES[family]]
    if shape not in tiny_shapes:
        raise ValueError(f"shape={shape!r} is not a tiny shape of {family}; use one of {tiny_shapes}.")
    if embedder is not None and EMBEDDERS.get(embedder) != family:
        raise ValueError(f"embedder={embedder!r} is built on {EMBEDDERS.get(embedder)}, not {family}.")
    layout = layout or HUB_LAYOUT[family]
    token_ids, num_tokens = save_tiny_processor(out_dir, family, max_pixels=max_pixels, embedder=embedder)
    if embedder == "gme":  # GME's Hub repository ships its inference code beside the weights
        with open(os.path.join(out_dir, "gme_inference.py"), "w", encoding="utf-8") as f:
            f.write('"""GME inference code (stand-in)."""\n')
    vocab_size = (num_tokens + 8 + 63) // 64 * 64  # padded rows beyond the tokenizer, as in real checkpoints
    config = hub_config(family, shape, str(dtype).replace("torch.", ""), token_ids, vocab_size, num_hidden_layers,
                        nested=family.startswith("qwen3_vl") or layout != "old")
    write_random_checkpoint(out_dir, config, layout, num_shards, seed, dtype)
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_vl")
    parser.add_argument("--layout", choices=LAYOUTS, default=None, help="default: the family's Hub layout")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--shape", default="tiny", help="tiny, tiny64 (vLLM's CPU build), small (qwen2_vl), 2b, 8b")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.shape not in SHAPES[args.family]:
        parser.error(f"--shape {args.shape} is not one of {sorted(SHAPES[args.family])} for {args.family}.")
    dtype = getattr(torch, args.dtype)
    layout = args.layout or HUB_LAYOUT[args.family]
    if args.shape in ("tiny", "tiny64"):
        build_tiny_checkpoint(args.out_dir, args.family, layout, args.shards, args.seed, dtype=dtype, shape=args.shape)
    else:
        token_ids, num_tokens = save_tiny_processor(args.out_dir, args.family)  # the embedding token needs one
        vocab_size = None if args.shape in ("2b", "8b") else (num_tokens + 8 + 63) // 64 * 64
        config = hub_config(args.family, args.shape, args.dtype, token_ids, vocab_size,
                            nested=args.family.startswith("qwen3_vl") or layout != "old")
        write_random_checkpoint(args.out_dir, config, layout, args.shards, args.seed, dtype)
    print(f"wrote {args.shape} {args.family} checkpoint ({layout} layout, {args.shards} shard(s)) to {args.out_dir}")


if __name__ == "__main__":
    main()
