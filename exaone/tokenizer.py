"""EXAONE 4.0 tokenizer: HF `tokenizer.json` + jinja chat template, with transformers' method names.

`load_tokenizer(path)` reads a checkpoint folder; `Tokenizer.apply_chat_template` renders a conversation
exactly as `transformers` does (same sandboxed jinja environment, filters and variables) and, for text
without injected markers, produces the same ids.

Security: strings that come from messages, tools or template kwargs never become added tokens. Before
rendering, every added-token string inside them is swapped for a private-use placeholder; after rendering
the text is split at the tokens the template itself wrote, and each plain piece (placeholders restored
to the original characters) is encoded with no added-token matching. The one exception is `<think>` /
`</think>` inside assistant `content`, which the template must see to drop earlier reasoning.

This module must not download anything, import transformers, or change the backend tokenizer's vocab.
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer as _Backend

DEFAULT_CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")

# Placeholder scheme: ESC + chr(_BASE + i) stands for added token i; a literal ESC in user text is
# written ESC + ESC. Both code points are private use (plane 16), so real text almost never holds them,
# and when it does the escape keeps the mapping reversible.
_ESC = "\U0010FFFD"
_BASE = 0x100000
_PLACEHOLDER_RE = re.compile(f"{_ESC}(.)", re.DOTALL)
_UNSANITIZED_IN_ASSISTANT = ("<think>", "</think>")


class ChatTemplateError(ValueError):
    """Raised by `raise_exception(...)` inside a chat template (e.g. an unknown role)."""


@lru_cache(maxsize=16)
def _compile_template(source: str):
    """Compile once per template text, in the same environment transformers builds."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers overrides it with plain json.dumps.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """A fresh copy built of JSON types only (pydantic models dumped), as transformers gives the template."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (str enums, numpy scalars) are cut back to the base type, so the sandbox sees no extra methods.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus special tokens and a chat template.

    `encode` matches added tokens in the text, as `transformers`' `encode(text, add_special_tokens=False)`
    does; `encode_plain` never does (use it for untrusted text you encode outside a chat template).
    """

    def __init__(self, backend: _Backend, special_tokens: dict | None = None, chat_template: str | None = None,
                 model_max_length: int | None = None, config: dict | None = None):
        self._backend = backend
        self._config = dict(config or {})  # tokenizer_config.json as read, written back by save_pretrained
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        self.added_tokens_decoder = dict(sorted(added.items()))
        self.added_tokens_encoder = {tok.content: i for i, tok in self.added_tokens_decoder.items()}
        # A twin without added tokens encodes plain pieces in Rust, batched.
        data = json.loads(backend.to_str())
        data["added_tokens"] = []
        self._plain_backend = _Backend.from_str(json.dumps(data, ensure_ascii=False))
        # Longest first, so a token wins over a token it contains (as the backend's matcher does).
        by_length = sorted(self.added_tokens_encoder, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, by_length)) or "(?!)")
        self._placeholder = {tok: _ESC + chr(_BASE + i) for i, tok in enumerate(by_length)}
        self._from_placeholder = {chr(_BASE + i): tok for i, tok in enumerate(by_length)}

        special = dict(special_tokens or {})
        self.bos_token = special.get("bos_token")
        self.eos_token = special.get("eos_token")
        self.pad_token = special.get("pad_token")
        self.unk_token = special.get("unk_token")
        self.additional_special_tokens = list(special.get("additional_special_tokens") or [])

    def save_pretrained(self, out_dir) -> Path:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) to out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(out / "tokenizer.json"))
        config = dict(self._config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        if self.additional_special_tokens:
            config["additional_special_tokens"] = self.additional_special_tokens
        if self.model_max_length:
            config["model_max_length"] = self.model_max_length
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in self.added_tokens_decoder.items()}
        config["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        return out

    # ---- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._backend.token_to_id(tokens)
        return [self._backend.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(int(i)) for i in ids]

    def _id(self, token):
        return None if token is None else self._backend.token_to_id(token)

    bos_token_id = property(lambda self: self._id(self.bos_token))
    eos_token_id = property(lambda self: self._id(self.eos_token))
    pad_token_id = property(lambda self: self._id(self.pad_token))
    unk_token_id = property(lambda self: self._id(self.unk_token))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens, then additional ones, then any other added token marked special."""
        seen: list[str] = []
        marked = [t.content for t in self.added_tokens_decoder.values() if t.special]
        for tok in [*self.special_tokens_map.values(), *self.additional_special_tokens, *marked]:
            if tok not in seen:
                seen.append(tok)
        return seen

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    # ---- encode / decode ----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Like transformers: added tokens written in `text` become their ids."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_plain(self, text: str) -> list[int]:
        """Encode `text` as text only: `[|endofturn|]` here is 7 ordinary tokens, never the special id."""
        return self._plain_backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        elif hasattr(ids, "tolist"):  # torch / numpy
            ids = ids.tolist()
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # ---- chat template ------------------------------------------------------------------------
    def apply_chat_template(self, messages, tools=None, add_generation_prompt: bool = False,
                            tokenize: bool = True, return_dict: bool = False, chat_template: str | None = None,
                            **template_kwargs):
        """Render `messages` (list of dicts) with the chat template.

        Returns the text (tokenize=False), a list of ids (tokenize=True), or
        {"input_ids", "attention_mask"} (tokenize=True, return_dict=True). Extra keyword arguments are
        template variables, e.g. enable_thinking=True, skip_think=False.
        """
        text = self._render_sanitized(messages, tools, add_generation_prompt, chat_template, template_kwargs)
        if not tokenize:
            return self._restore(text)
        ids = self._encode_rendered(text)
        if return_dict:
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        return ids

    def render_chat(self, messages, tools=None, add_generation_prompt: bool = False, **template_kwargs) -> str:
        """The rendered text (same as apply_chat_template(..., tokenize=False))."""
        return self.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                        tokenize=False, **template_kwargs)

    def _render_sanitized(self, messages, tools, add_generation_prompt, chat_template, template_kwargs) -> str:
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template")
        if hasattr(messages, "messages"):
            messages = messages.messages
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        chat = []
        for message in _plain(list(messages)):
            if not isinstance(message, dict):
                raise TypeError(f"chat messages must be dicts, got {message!r}")
            # As transformers: None values are dropped, and `reasoning`/`thinking` also fill `reasoning_content`.
            message = {k: v for k, v in message.items() if v is not None}
            reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning")
                              if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            chat.append(self._sanitize_message(message))
        tools = None if tools is None else self._sanitize(_plain(list(tools)))
        kwargs = self._sanitize(_plain(template_kwargs))
        variables = {**self.special_tokens_map, **kwargs}  # kwargs win, as in transformers
        return _compile_template(template).render(messages=chat, tools=tools, documents=None,
                                                  add_generation_prompt=add_generation_prompt, **variables)

    def _sanitize_message(self, message: dict) -> dict:
        if message.get("role") != "assistant" or "content" not in message:
            return self._sanitize(message)
        # Assistant content keeps <think>/</think>: the template splits reasoning from the answer on them.
        out = self._sanitize({k: v for k, v in message.items() if k != "content"})
        out["content"] = self._sanitize(message["content"], keep=_UNSANITIZED_IN_ASSISTANT)
        return out

    def _sanitize(self, obj: Any, keep: tuple[str, ...] = ()) -> Any:
        """Swap added-token strings for placeholders in every string (dict keys included)."""
        if isinstance(obj, str):
            obj = obj.replace(_ESC, _ESC + _ESC)
            return self._added_re.sub(lambda m: m[0] if m[0] in keep else self._placeholder[m[0]], obj)
        if isinstance(obj, dict):
            return {self._sanitize(k, keep): self._sanitize(v, keep) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._sanitize(v, keep) for v in obj]
        return obj

    def _restore(self, text: str) -> str:
        return _PLACEHOLDER_RE.sub(lambda m: _ESC if m[1] == _ESC else self._from_placeholder.get(m[1], m[0]), text)

    def _encode_rendered(self, text: str) -> list[int]:
        """Split at the added tokens the template wrote; encode the rest as plain text."""
        pieces: list[tuple[str, int | None]] = []
        pos = 0
        for m in self._added_re.finditer(text):
            if m.start() > pos:
                pieces.append((self._restore(text[pos:m.start()]), None))
            pieces.append((m[0], self.added_tokens_encoder[m[0]]))
            pos = m.end()
        if pos < len(text):
            pieces.append((self._restore(text[pos:]), None))
        plain = [p for p, tid in pieces if tid is None]
        encoded = iter(self._plain_backend.encode_batch(plain, add_special_tokens=False)) if plain else iter(())
        ids: list[int] = []
        for piece, tid in pieces:
            ids.extend(next(encoded).ids if tid is None else [tid])
        return ids


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load a tokenizer from a checkpoint folder (or its tokenizer.json).

    Reads tokenizer.json, the special tokens and chat template from tokenizer_config.json; the template
    falls back to chat_template.jinja in the folder, then to the package's own template.
    path=None: the default model's tokenizer (`loader.default_model_path()`: the embedded demo model
    or $EXAONE_MODEL), the same checkpoint `exaone.load(None)` reads, so the two always match.
    """
    if path is None:
        from .loader import default_model_path
        path = default_model_path()
    path = Path(path)
    folder = path.parent if path.suffix == ".json" and not path.is_dir() else path
    tok_file = path if folder is not path else folder / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {tok_file.resolve()}")
    _read_json(tok_file)  # a clear error naming the file, rather than the backend's bare message
    try:
        backend = _Backend.from_file(str(tok_file))
    except Exception as e:  # the backend raises a bare Exception for malformed content
        raise ValueError(f"{tok_file}: cannot be read as a tokenizers file ({e})") from e

    config_file = folder / "tokenizer_config.json"
    config = _read_json(config_file) if config_file.is_file() else {}
    special = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(name)
        if isinstance(value, dict):  # older configs store AddedToken dicts
            value = value.get("content")
        if value is not None:
            special[name] = value
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    if isinstance(extra, list):
        special["additional_special_tokens"] = [t["content"] if isinstance(t, dict) else t for t in extra]

    template = config.get("chat_template")
    if isinstance(template, list):  # older multi-template form: [{"name": ..., "template": ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = DEFAULT_CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    return Tokenizer(backend, special_tokens=special, chat_template=template,
                     model_max_length=config.get("model_max_length"), config=config)
