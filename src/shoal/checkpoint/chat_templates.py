"""A recipe's ``chat_template``: a built-in name, ``auto``, or a Jinja template, written to the output.

As mergekit reads the key: a short string without ``{`` or a newline is a built-in name;
``auto`` picks the template most of the source models have (nothing is written when none has
one); anything else must be a Jinja template (it contains ``{``). The template is written as
``chat_template.jinja``, the file transformers reads first, and the key in
``tokenizer_config.json`` (and a ``chat_template.json``) copied from a source is removed, so
the folder holds one template.

The built-in templates are written here from each format's published description (ChatML,
Meta's Llama 3 prompt format, Mistral's [INST] format, Stanford Alpaca's, LG's EXAONE); rendered with transformers' settings
they give the prompts mergekit's templates of the same names give (mergekit's ``llama3`` puts a
newline after each ``<|eot_id|>``, so this one does too).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

from shoal.errors import RecipeError

TEMPLATE_FILE = "chat_template.jinja"

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for message in messages -%}\n"
        "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "{{- '<|im_start|>assistant\\n' -}}\n"
        "{%- endif -%}\n"
    ),
    "llama3": (
        "{%- for message in messages -%}\n"
        "{%- if loop.first -%}{{- bos_token -}}{%- endif -%}\n"
        "{{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' ~ message['content'] | trim"
        " ~ '<|eot_id|>\\n' -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
        "{%- endif -%}\n"
    ),
    "mistral": (
        "{%- set has_system = messages and messages[0]['role'] == 'system' -%}\n"
        "{%- set turns = messages[1:] if has_system else messages -%}\n"
        "{{- bos_token -}}\n"
        "{%- for message in turns -%}\n"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
        "{{- raise_exception('roles must alternate user/assistant after an optional system message') -}}\n"
        "{%- endif -%}\n"
        "{%- if message['role'] == 'user' -%}\n"
        "{%- set text = messages[0]['content'] ~ '\\n\\n' ~ message['content'] if loop.first and has_system"
        " else message['content'] -%}\n"
        "{{- ' [INST] ' ~ text ~ ' [/INST]' -}}\n"
        "{%- elif message['role'] == 'assistant' -%}\n"
        "{{- ' ' ~ message['content'] ~ eos_token -}}\n"
        "{%- else -%}\n"
        "{{- raise_exception('only user and assistant roles, and a first system message, are supported') -}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
    ),
    # Stanford Alpaca's prompt format: an optional system text, then "### Instruction:",
    # "### Input:" (role user_context) and "### Response:" sections, as mergekit's alpaca renders it
    "alpaca": (
        "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}\n"
        "{{- (systems | last).content | trim if systems else '' -}}\n"
        "{{- '\\n\\n' -}}\n"
        "{%- for message in messages -%}\n"
        "{%- if message['role'] == 'user' -%}{%- set heading = '### Instruction:' -%}\n"
        "{%- elif message['role'] == 'assistant' -%}{%- set heading = '### Response:' -%}\n"
        "{%- elif message['role'] == 'user_context' -%}{%- set heading = '### Input:' -%}\n"
        "{%- else -%}{%- set heading = '' -%}{%- endif -%}\n"
        "{%- if heading -%}\n"
        "{{- heading ~ '\\n' ~ message['content'] | trim -}}\n"
        "{%- if not loop.last -%}{{- '\\n\\n' -}}{%- endif -%}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}\n"
        "{{- '### Response:\\n' -}}\n"
        "{%- endif -%}\n"
    ),
    # LG's EXAONE format: [|role|]text, [|endofturn|] after every turn but the user's, an empty
    # system turn first when there is none; with the indentation mergekit's exaone template emits
    # (its spaces sit outside the block tags, so transformers' settings keep them)
    "exaone": (
        "{%- for message in messages -%}\n"
        "{%- if loop.first and message['role'] != 'system' -%}\n"
        "{{- '        [|system|][|endofturn|]\\n\\n' -}}\n"
        "{%- endif -%}\n"
        "{{- '    [|' ~ message['role'] ~ '|]' ~ message['content'] ~ '\\n        ' -}}\n"
        "{{- '\\n\\n' if message['role'] == 'user' else '[|endofturn|]\\n\\n' -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "{{- '    [|assistant|]\\n' -}}\n"
        "{%- endif -%}\n"
    ),
}


def _source_template(folder: Path) -> str | None:
    """The chat template a model folder carries (``chat_template.jinja`` or its tokenizer config), if any."""
    jinja = folder / TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError):
            return None
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template if isinstance(template, str) else None
    return None


def resolve_chat_template(value: str, source_folders: Sequence[Path]) -> str | None:
    """The template text a recipe's ``chat_template`` stands for (None: ``auto`` found none)."""
    if value == "auto":
        found = [t.strip() for t in (_source_template(Path(f)) for f in source_folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        if value in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[value]
        raise RecipeError(f"chat_template {value!r}: not a built-in template ({', '.join(BUILTIN_TEMPLATES)}, "
                          "auto) nor a Jinja template")
    if len(value) < 20 or "{" not in value:
        raise RecipeError(f"chat_template {value[:40]!r}: not a Jinja template")
    return value


def write_chat_template(out_dir: Path, template: str) -> None:
    """Make ``template`` the output folder's one chat template."""
    out_dir = Path(out_dir)
    (out_dir / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    (out_dir / "chat_template.json").unlink(missing_ok=True)
    config = out_dir / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "chat_template" in data:
            del data["chat_template"]
            config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
