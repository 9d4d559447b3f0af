"""open_clip's CLIP tokenizer with the same output at a third of the per-caption cost.

At 84 px the loader has ~650 µs per sample on one core and open_clip's ``SimpleTokenizer``
takes ~90 of them per caption: ``ftfy.fix_text`` (~25 µs even on plain ASCII, where it
changes nothing) and, per word, a byte-to-unicode join, a BPE-cache lookup, a split and
vocabulary lookups. ``CachedTokenizer`` keeps a word -> token-ids table and skips ftfy on
captions it provably leaves alone, and returns exactly what the wrapped tokenizer returns
(tests/test_data_pipeline.py compares them). open_clip has no such path: its BPE cache
stops at the merged string, and it has no fast path around ftfy.
"""
from __future__ import annotations

import re
from typing import List, Optional, Union

import torch

# printable ASCII without '&': ftfy.fix_text returns such text unchanged (every fix it makes
# needs a non-ASCII character, a control character or an HTML entity) and html.unescape too
_PLAIN = re.compile(r"[\x20-\x25\x27-\x7e]*")
_WORD_CACHE_LIMIT = 1_000_000  # distinct words kept (~100 MB at most); past it, words are encoded uncached


def _after_basic_clean(clean_fn):
    """What ``clean_fn`` does after open_clip's ``basic_clean`` (ftfy + unescape + strip), or None."""
    from open_clip import tokenizer as t

    rest = {
        getattr(t, "_clean_lower", None): lambda s: t.whitespace_clean(s).lower(),
        getattr(t, "_clean_whitespace", None): t.whitespace_clean,
        getattr(t, "_clean_canonicalize", None): t.canonicalize_text,
    }
    rest.pop(None, None)
    return rest.get(clean_fn)


class CachedTokenizer:
    """Wraps an open_clip ``SimpleTokenizer``; call it as that tokenizer (same arguments, same ids)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._rest = _after_basic_clean(tokenizer.clean_fn)
        self._ids: dict = {}

    @staticmethod
    def supports(tokenizer) -> bool:
        from open_clip.tokenizer import SimpleTokenizer

        return isinstance(tokenizer, SimpleTokenizer) and tokenizer.reduction_fn is None

    def __getattr__(self, name):  # sot_token_id, vocab_size, decode, ...
        return getattr(self.tokenizer, name)

    def _clean(self, text: str) -> str:
        if self._rest is not None and _PLAIN.fullmatch(text):
            return self._rest(text.strip())
        return self.tokenizer.clean_fn(text)

    def _word(self, word: str) -> tuple:
        tok = self.tokenizer
        unicode = "".join(tok.byte_encoder[b] for b in word.encode("utf-8"))
        return tuple(tok.encoder[piece] for piece in tok.bpe(unicode).split(" "))

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        for word in self.tokenizer.pat.findall(self._clean(text)):
            got = self._ids.get(word)
            if got is None:
                got = self._word(word)
                if len(self._ids) < _WORD_CACHE_LIMIT:
                    self._ids[word] = got
            ids.extend(got)
        return ids

    def __call__(self, texts: Union[str, List[str]], context_length: Optional[int] = None) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.tokenizer.context_length
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        rows = []
        for text in texts:
            tokens = [sot] + self.encode(text) + [eot]
            if len(tokens) > n:
                tokens = tokens[:n]
                tokens[-1] = eot
            rows.append(tokens + [0] * (n - len(tokens)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), n)


def fast_tokenizer(tokenizer):
    """``tokenizer`` wrapped in ``CachedTokenizer`` where that gives the same ids, else unchanged."""
    return CachedTokenizer(tokenizer) if CachedTokenizer.supports(tokenizer) else tokenizer
