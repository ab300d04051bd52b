"""Tokenizers for `centrifuge train`: a byte-level BPE trained in-process (and cached), or a local one.

Byte-level BPE covers every input byte, so any text encodes without unknown tokens. Training it on the
~0.5 MB built-in corpus takes well under a second; the result is still cached, keyed by a hash of the
training texts and settings, so that repeated runs share it and a run's tokenizer never silently changes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from centrifuge._io import atomic_write
from centrifuge.train.errors import DataError

EOS_TOKEN = "<|endoftext|>"
# Token strings other tokenizers use for end-of-text, tried in order when only a tokenizer.json is given.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<|im_end|>", "<eos>")
_CACHE_FORMAT = "bpe-v1"  # bump when the training recipe changes, so old cache entries are not reused


@dataclass
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the id that ends a document (also used, masked out, as padding)."""

    backend: tokenizers.Tokenizer
    eos_id: int

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, with no special tokens added (documents get EOS during packing)."""
        return [enc.ids for enc in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids))

    def save(self, directory: str) -> None:
        """Write a Hugging Face tokenizer directory (``AutoTokenizer.from_pretrained`` reads it)."""
        from transformers import PreTrainedTokenizerFast

        eos = self.backend.id_to_token(self.eos_id)
        hf = PreTrainedTokenizerFast(tokenizer_object=self.backend, eos_token=eos, pad_token=eos)
        hf.save_pretrained(directory)


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> TextTokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (EOS is id 0). Deterministic for given texts."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise DataError(f"a byte-level BPE needs a vocabulary of at least {len(alphabet) + 2} (got {vocab_size})")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return TextTokenizer(backend, backend.token_to_id(EOS_TOKEN))


def default_cache_dir() -> str:
    """$CENTRIFUGE_CACHE, else $XDG_CACHE_HOME/centrifuge, else ~/.cache/centrifuge."""
    if os.environ.get("CENTRIFUGE_CACHE"):
        return os.environ["CENTRIFUGE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "centrifuge")


def bpe_cache_key(texts: Sequence[str], vocab_size: int, *, min_frequency: int = 2) -> str:
    """Hash of everything that determines the trained tokenizer: texts, vocab size, recipe version."""
    h = hashlib.sha256()
    h.update(f"{_CACHE_FORMAT}|{vocab_size}|{min_frequency}|{tokenizers.__version__}|{len(texts)}|".encode())
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))  # length prefix: ["ab","c"] and ["a","bc"] differ
        h.update(data)
    return h.hexdigest()[:20]


def cached_bpe(
    texts: Sequence[str], vocab_size: int, *, cache_dir: str | None = None, min_frequency: int = 2
) -> tuple[TextTokenizer, str, bool]:
    """Train (or reuse) a BPE for ``texts``. Returns (tokenizer, cache file, whether it was a cache hit)."""
    directory = os.path.join(cache_dir or default_cache_dir(), "tokenizers")
    path = os.path.join(directory, f"{bpe_cache_key(texts, vocab_size, min_frequency=min_frequency)}.json")
    if os.path.isfile(path):
        try:
            return load_tokenizer(path), path, True
        except DataError:
            pass  # an unreadable cache entry is rebuilt below (and replaced atomically)
    tokenizer = train_bpe(texts, vocab_size, min_frequency=min_frequency)
    atomic_write(path, tokenizer.backend.save, suffix=".json")  # concurrent runs never read a half-written file
    return tokenizer, path, False


def load_tokenizer(path: str) -> TextTokenizer:
    """A ``tokenizer.json`` file or a local Hugging Face tokenizer directory (no hub access)."""
    if os.path.isfile(path):
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as err:
            raise DataError(f"cannot read tokenizer file {path!r}: {err}") from None
        for token in _EOS_CANDIDATES:
            eos = backend.token_to_id(token)
            if eos is not None:
                return TextTokenizer(backend, eos)
        raise DataError(f"tokenizer {path!r} has no end-of-text token (looked for {', '.join(_EOS_CANDIDATES)})")
    if os.path.isdir(path):
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as err:
            raise DataError(f"cannot load the tokenizer in {path!r}: {err}") from None
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise DataError(f"the tokenizer in {path!r} has no fast (tokenizers) version")
        if hf.eos_token_id is None:
            raise DataError(f"the tokenizer in {path!r} has no eos_token; set data.tokenizer=train")
        return TextTokenizer(backend, int(hf.eos_token_id))
    raise DataError(f"tokenizer {path!r} does not exist")


def has_tokenizer(directory: str) -> bool:
    """Whether a model directory ships a tokenizer that ``load_tokenizer`` can read."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    return os.path.isdir(directory) and any(os.path.isfile(os.path.join(directory, n)) for n in names)
