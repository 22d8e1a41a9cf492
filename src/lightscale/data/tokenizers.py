"""Tokenizers for the language-model example: bytes, characters, or GPT-2's BPE (via ``tiktoken``).

All three share a small interface: ``name``, ``vocab_size``, ``encode(text) -> np.ndarray`` of ids and
``decode(ids) -> str``. Encoding is vectorised with numpy where possible because the whole corpus passes
through it once when the token shards are prepared.
"""

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

TokenizerName = Literal["byte", "char", "gpt2"]
Ids = Sequence[int] | np.ndarray


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Ids) -> str: ...


def _as_int_array(ids: Ids) -> np.ndarray:
    if hasattr(ids, "tolist") and not isinstance(ids, np.ndarray):  # a torch tensor
        ids = ids.tolist()
    return np.asarray(ids, dtype=np.int64).reshape(-1)


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256): no vocabulary file, no unknown symbols, lossless on any input.

    Decoding replaces invalid UTF-8 (a model can emit half a multi-byte character) with U+FFFD instead of
    failing.
    """

    name = "byte"
    vocab_size = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).copy()

    def decode(self, ids: Ids) -> str:
        array = _as_int_array(ids)
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError("byte token ids must lie in [0, 255]")
        return array.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class CharTokenizer:
    """One token per Unicode character of the corpus (nanoGPT's ``shakespeare_char``): tiny vocabularies
    (65 symbols for Shakespeare), so small models learn spelling quickly.

    ``chars`` is the sorted alphabet; the id of a character is its position in it. The alphabet is saved as
    JSON next to the token shards, since the ids mean nothing without it.
    """

    name = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = sorted(set(chars))
        if not self.chars or any(len(c) != 1 for c in self.chars):
            raise ValueError("CharTokenizer needs a non-empty alphabet of single characters")
        self.vocab_size = len(self.chars)
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.int64)  # sorted, for searchsorted

    def encode(self, text: str) -> np.ndarray:
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.searchsorted(self._codepoints, codepoints)
        ids_clipped = np.minimum(ids, self.vocab_size - 1)
        unknown = self._codepoints[ids_clipped] != codepoints
        if unknown.any():
            missing = "".join(sorted({chr(c) for c in codepoints[unknown][:1000].tolist()}))
            raise ValueError(f"characters not in the tokenizer's alphabet: {missing!r}")
        return ids.astype(np.uint32 if self.vocab_size > 65535 else np.uint16)

    def decode(self, ids: Ids) -> str:
        return "".join(self.chars[i] for i in _as_int_array(ids).tolist())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"tokenizer": "char", "chars": "".join(self.chars)}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        return cls(json.loads(Path(path).read_text())["chars"])


class TiktokenTokenizer:
    """OpenAI's byte-level BPE (``gpt2``: 50,257 tokens) through the optional ``tiktoken`` package.

    tiktoken downloads the merge table on first use and caches it (``TIKTOKEN_CACHE_DIR``); on a machine
    without network access, copy that cache over first.
    """

    def __init__(self, encoding: str = "gpt2") -> None:
        try:
            import tiktoken
        except ImportError:
            raise ImportError(
                "the 'gpt2' tokenizer needs tiktoken: pip install 'lightscale[bpe]' (or pip install tiktoken)"
            ) from None
        try:
            self._encoding = tiktoken.get_encoding(encoding)
        except Exception as error:  # network errors differ by backend (requests / urllib3 / blobfile)
            raise RuntimeError(
                f"tiktoken could not load the {encoding!r} encoding ({type(error).__name__}); it is "
                "downloaded on first use: run once with network access, or point TIKTOKEN_CACHE_DIR at a "
                "cache that holds it"
            ) from None
        self.name = encoding
        self.vocab_size = self._encoding.n_vocab
        self._eot = self._encoding.eot_token

    def encode(self, text: str) -> np.ndarray:
        # encode_ordinary: special-token strings such as "<|endoftext|>" in the text stay plain text
        return np.asarray(
            self._encoding.encode_ordinary(text), dtype=np.uint32 if self.vocab_size > 65535 else np.uint16
        )

    def decode(self, ids: Ids) -> str:
        return self._encoding.decode(_as_int_array(ids).tolist(), errors="replace")


def build_tokenizer(name: TokenizerName, chars: Iterable[str] | None = None) -> Tokenizer:
    """The tokenizer called ``name``; ``char`` needs its alphabet (``chars``), read from the corpus."""
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        if chars is None:
            raise ValueError("the char tokenizer needs its alphabet (chars=...)")
        return CharTokenizer(chars)
    if name == "gpt2":
        return TiktokenTokenizer("gpt2")
    raise ValueError(f"unknown tokenizer {name!r}; choose byte, char or gpt2")
