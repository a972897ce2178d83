"""SentencePiece (Llama 2, Mistral, CodeLlama), tiktoken (Llama 3) and Hugging Face tokenizer.json behind one small
interface.

`get_tokenizer(path)` picks the kind from the file's contents, not its name; `find_tokenizer(folder)` the file.
"""

import base64
import json
from pathlib import Path
from typing import Optional

# Llama 3's pre-tokenizer split pattern and special tokens (ids follow the 128000 BPE ranks)
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
LLAMA3_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]  # fmt: skip


class BuiltinChat:
    """A conversation [{"role": "system" | "user" | "assistant", "content": ...}] in a built-in chat format,
    turn by turn (encode_chat, end_of_turn); the reply's header last, for the model to answer. An assistant turn
    with "ids" is those tokens, as generated."""

    def encode_dialog(self, messages: list[dict]) -> list[int]:
        ids, system = [], None
        for m in messages:
            if m["role"] == "system":
                system = m["content"]
            elif m["role"] == "user":
                ids += self.encode_chat(m["content"], first_turn=not ids, system=system)
            else:  # the reply's own tokens where the conversation kept them
                ids += m.get("ids", self.encode(m["content"], bos=False)) + self.end_of_turn()
        return ids


class SentencePieceTokenizer(BuiltinChat):
    def __init__(self, model_path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.sp.bos_id()] if bos else []) + self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])  # a model's padded vocab has more ids

    def bos_id(self) -> int:
        return self.sp.bos_id()

    def stop_ids(self) -> list[int]:
        return [self.sp.eos_id()]

    def encode_chat(self, message: str, first_turn: bool = True, system: Optional[str] = None) -> list[int]:
        """Llama 2 / Mistral instruction format: <s>[INST] message [/INST]; every turn opens with <s>; a system
        prompt goes inside the first turn's [INST]."""
        if first_turn and system:
            message = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{message.strip()}"
        return self.encode(f"[INST] {message.strip()} [/INST]")

    def end_of_turn(self) -> list[int]:
        return [self.sp.eos_id()]


class TiktokenTokenizer(BuiltinChat):
    def __init__(self, model_path):
        import tiktoken

        ranks = load_tiktoken_ranks(model_path)
        special = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_SPECIAL)}
        self.enc = tiktoken.Encoding(
            Path(model_path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special
        )
        self.special = special
        self.vocab_size = len(ranks) + len(special)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id()] if bos else []) + self.enc.encode(text, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode([i for i in ids if 0 <= i < self.vocab_size])  # a model's padded vocab has more ids

    def bos_id(self) -> int:
        return self.special["<|begin_of_text|>"]

    def stop_ids(self) -> list[int]:
        return [self.special[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]

    def encode_chat(self, message: str, first_turn: bool = True, system: Optional[str] = None) -> list[int]:
        """Llama 3 chat format: a user turn, then the assistant header; <|begin_of_text|> and the system turn only
        once."""
        header = "<|start_header_id|>{}<|end_header_id|>\n\n"
        text = header.format("user") + message.strip() + "<|eot_id|>" + header.format("assistant")
        if first_turn and system:
            text = header.format("system") + system.strip() + "<|eot_id|>" + text
        return self.encode(text, bos=first_turn)

    def end_of_turn(self) -> list[int]:
        return [self.special["<|eot_id|>"]]


class HFTokenizer:
    """A Hugging Face tokenizer.json, read by the `tokenizers` library as transformers reads it; the special tokens
    from tokenizer_config.json and generation_config.json beside it. Its post-processor adds BOS where the file
    says so."""

    def __init__(self, model_path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError(f"{model_path} is a tokenizer.json: reading it needs `pip install tokenizers`") from None
        self.tok = Tokenizer.from_file(str(model_path))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        config = read_json(Path(model_path).parent / "tokenizer_config.json")
        generation = read_json(Path(model_path).parent / "generation_config.json")
        self.bos, eos = (self.token_id(config.get(k)) for k in ("bos_token", "eos_token"))
        eos_ids = generation.get("eos_token_id", eos)
        self.eos = [i for i in (eos_ids if isinstance(eos_ids, list) else [eos_ids]) if i is not None]
        self.special_tokens = {k: v.get("content") if isinstance(v, dict) else v for k, v in config.items()}
        self.special_tokens = {k: v for k, v in self.special_tokens.items() if k.endswith("_token") and v}
        self.chat_template = read_chat_template(Path(model_path).parent, config)

    def token_id(self, token) -> Optional[int]:
        token = token.get("content") if isinstance(token, dict) else token  # tokenizer_config keeps either form
        return self.tok.token_to_id(token) if token else None

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=bos).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True)

    def bos_id(self) -> Optional[int]:
        return self.bos

    def stop_ids(self) -> list[int]:
        return self.eos

    def encode_dialog(self, messages: list[dict]) -> list[int]:
        """The conversation rendered by the model's own chat template, as transformers' apply_chat_template."""
        if self.chat_template is None:
            raise ValueError("this tokenizer.json model has no chat_template in tokenizer_config.json")
        text = render_chat_template(self.chat_template, messages, self.special_tokens)
        return self.tok.encode(text, add_special_tokens=False).ids  # the template writes its own BOS


def read_chat_template(folder: Path, config: dict) -> Optional[str]:
    """tokenizer_config.json's chat_template (a string, or named templates: the default one), else the
    chat_template.jinja file newer transformers write beside it."""
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return template


def render_chat_template(template: str, messages: list[dict], special_tokens: dict) -> str:
    """Jinja rendering as transformers does it: a sandbox, trimmed blocks, loop controls, raise_exception and
    strftime_now, and the reply's header (add_generation_prompt)."""
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, ensure_ascii=False, **kw: json.dumps(x, ensure_ascii=ensure_ascii, **kw)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special_tokens)
    except jinja2.TemplateError as e:
        raise ValueError(f"cannot render the chat template: {e}") from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def find_tokenizer(folder: Path) -> Path:
    """The tokenizer file of a model folder: tokenizer.model (SentencePiece or tiktoken), else tokenizer.json."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return Path(folder) / "tokenizer.model"


def load_tiktoken_ranks(model_path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one 'base64-token rank' pair per line."""
    ranks = {}
    for n, line in enumerate(Path(model_path).read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{model_path}: line {n} is not a tiktoken 'base64 rank' pair") from None
    return ranks


def is_tiktoken_file(model_path) -> bool:
    """A tiktoken file is text whose first line is 'base64 rank'; SentencePiece is a binary protobuf."""
    with open(model_path, "rb") as f:
        first = f.readline(512).split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
        return True
    except ValueError:
        return False


def get_tokenizer(model_path):
    """Open a tokenizer file of either kind; ValueError if it is neither."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {model_path}")
    if is_tiktoken_file(model_path):
        return TiktokenTokenizer(model_path)
    with open(model_path, "rb") as f:
        if f.read(64).lstrip().startswith(b"{"):  # JSON: a Hugging Face tokenizer.json
            return HFTokenizer(model_path)
    try:
        return SentencePieceTokenizer(model_path)
    except (RuntimeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{model_path} is neither a SentencePiece nor a tiktoken model ({reason})") from None
