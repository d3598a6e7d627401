"""A fast tokenizer front for Hugging Face model directories.

Loading ``AutoTokenizer`` costs seconds of imports; a directory with a
``tokenizer.json`` only needs the ``tokenizers`` library plus its chat
template (rendered with jinja2 like transformers does). Directories without
``tokenizer.json`` fall back to ``AutoTokenizer``. Both expose the same small
surface: ``encode``, ``decode``, ``apply_chat_template``, ``eos_token_id``,
``pad_token_id``.
"""

from __future__ import annotations

import json
from pathlib import Path


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<|im_end|>", ...}
        return value.get("content")
    return value


class FastTokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.chat_template = cfg.get("chat_template")
        tmpl = path / "chat_template.jinja"
        if self.chat_template is None and tmpl.is_file():
            self.chat_template = tmpl.read_text()
        tmpl_json = path / "chat_template.json"
        if self.chat_template is None and tmpl_json.is_file():
            self.chat_template = json.loads(tmpl_json.read_text()).get("chat_template")
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.pad_token = _token_text(cfg.get("pad_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.pad_token_id = self._tok.token_to_id(self.pad_token) if self.pad_token else None
        self._compiled = None

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer`` that ``decode`` uses (for incremental decoding)."""
        return self._tok

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self._tok.id_to_token(int(i)) for i in ids]

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kw):
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if self._compiled is None or self._compiled[0] != self.chat_template:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):        # what transformers raises too
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
            self._compiled = (self.chat_template, env.from_string(self.chat_template))
        text = self._compiled[1].render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kw)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def load_tokenizer(path: Path):
    """FastTokenizer when the directory has tokenizer.json, else AutoTokenizer, else None."""
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        try:
            return FastTokenizer(path)
        except Exception:
            pass
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    except Exception:
        return None  # a tokenizer-less checkpoint still works on token ids
