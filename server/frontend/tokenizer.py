"""Text <-> token ids: a Hugging Face `tokenizer.json`, or a byte-level fallback.

`load_tokenizer(folder, vocab_size)` uses the `tokenizers` library when the folder holds
`tokenizer.json`; otherwise ids 0..255 are the bytes of the UTF-8 text, and any higher
id (a random-init model samples them) decodes to nothing.

`IncrementalDecoder` turns a stream of ids into text deltas that never split a UTF-8
character (for the byte tokenizer the deltas join to exactly `decode(all ids)`).
"""

from __future__ import annotations

from pathlib import Path

BYTE_VOCAB = 256
REPLACEMENT = "\ufffd"  # what decoding yields for an incomplete (or invalid) UTF-8 sequence


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255."""

    max_token_bytes = 1  # of text one token covers (bounds a prompt's tokens before encoding)

    def __init__(self, vocab_size: int):
        if vocab_size < BYTE_VOCAB:
            raise ValueError(f"the byte-level tokenizer needs vocab_size >= {BYTE_VOCAB}, got {vocab_size} "
                             f"(give a folder with tokenizer.json)")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < BYTE_VOCAB).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` from tokenizer.json (special tokens added on encode, skipped on decode)."""

    def __init__(self, path: Path, vocab_size: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if size > vocab_size:
            raise ValueError(f"{str(path)!r} has {size} tokens, more than the model's vocab_size {vocab_size}")
        self.vocab_size = vocab_size
        # The longest token's UTF-8 length: at least the text bytes any one token covers
        # (a byte-level BPE token's k characters stand for k bytes; "<0xE2>" for one).
        self.max_token_bytes = max(len(t.encode("utf-8")) for t in self.tokenizer.get_vocab(True))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(folder: str | Path | None, vocab_size: int) -> ByteTokenizer | HFTokenizer:
    """`folder/tokenizer.json` if there is one, else the byte-level fallback."""
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"tokenizer folder {str(folder)!r} does not exist")
        if (folder / "tokenizer.json").is_file():
            return HFTokenizer(folder / "tokenizer.json", vocab_size)
    return ByteTokenizer(vocab_size)


class ChatTemplate:
    """A checkpoint folder's chat template, applied by transformers' tokenizer (the
    HTTP chat endpoint, client/chat.py and the demo all go through this). ValueError when
    the folder has none."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        import transformers

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.folder)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.folder} has no chat template")

    @classmethod
    def of(cls, checkpoint: str | None) -> ChatTemplate | None:
        """The checkpoint's template, or None (no checkpoint, or one without a template)."""
        try:
            return cls(checkpoint) if checkpoint else None
        except (ValueError, OSError):
            return None

    def ids(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def question(self, text: str) -> list[int]:
        """One user message, ready for the assistant's answer."""
        return self.ids([{"role": "user", "content": text}])


class IncrementalDecoder:
    """Streams text deltas for ids given one at a time.

    Invariant: the text of ids[:read] has been emitted. Each step decodes the window
    ids[prefix:] and emits what it adds to ids[prefix:read], unless it ends in an
    incomplete character; the left context ids[prefix:read] keeps word-boundary spaces
    right for SentencePiece-style tokenizers (the detokenizer of TGI and vLLM)."""

    CONTEXT = 5  # prompt ids kept as left context for the first generated token

    def __init__(self, tokenizer, prompt_ids=()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)[-self.CONTEXT:]
        self.prefix = 0  # window start
        self.read = len(self.ids)  # ids before this are already emitted

    def step(self, token_id: int) -> str:
        """Adds one id; returns the new text ("" while a character is incomplete)."""
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end of a stream: whatever is held back, incomplete characters as U+FFFD."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer.decode
        done = decode(self.ids[self.prefix:self.read])
        text = decode(self.ids[self.prefix:])
        if len(text) <= len(done) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]
