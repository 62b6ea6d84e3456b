"""The toy FLUX's two tokenizers, built locally over the synthetic world's vocabulary (no downloads).

FluxFillPipeline tokenizes every prompt twice: `tokenizer` (CLIP) for the pooled embedding and
`tokenizer_2` (T5) for the joint-attention sequence. Both must survive `save_pretrained` /
`from_pretrained` through transformers' own classes, and in transformers 5 those classes rebuild
their backend from the *vocabulary* in tokenizer.json with their own normaliser and
pre-tokenizer (only the post-processor, padding and truncation are kept). A `tokenizers`
WordLevel model would therefore come back as something else; each tokenizer is instead built in
its class's native model type, so what is saved is what is loaded:

- CLIP: byte-level BPE with CLIP's "</w>" word suffix. The vocabulary is the full byte alphabet
  (each byte alone and word-final, as in OpenAI's CLIP, so any prompt encodes without an unknown
  token), then one merge chain per world word, learned here by a deterministic little BPE trainer,
  so that every world word is a single token; then <|startoftext|> and <|endoftext|> last, as in
  CLIP. Pad = unk = eos = <|endoftext|> (CLIP's convention; CLIPTextModel pools at the first eos).
- T5: a Unigram model (T5's SentencePiece type) with <pad>=0, </s>=1, <unk>=2 first (T5's ids),
  then "▁word" for every world word with a score far above any spelling of it from single
  characters, then the printable ASCII characters. Digits are single pieces only, so "42" is
  "4", "2": one token per glyph of the text task. Characters outside printable ASCII are <unk>.

Sequence lengths: the world's longest prompt (the removal prompt) is 13 CLIP tokens with bos/eos
and 12 T5 tokens with </s>; both tokenizers default to 16. The pipeline pads CLIP to
`tokenizer.model_max_length`, but T5 to its call argument `max_sequence_length` (default 512),
so callers pass `max_sequence_length=tokenizer_2.model_max_length` (see docs/toy_flux.md).
"""
from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import pairwise

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer, T5TokenizerFast

from core.synthetic.world import VOCABULARY

# The instruction tasks' prompts (core/synthetic/instruction_world.py) also need its INSTRUCTION_WORDS: a toy for
# instruction editing would build its tokenizers over core.synthetic.instruction_world.INSTRUCTION_VOCABULARY.

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
WORD_SUFFIX = "</w>"
T5_SPACE = "\u2581"
DEFAULT_MAX_LENGTH = 16
# Unigram scores (log-probabilities): a whole world word always beats spelling it out
_WORD_SCORE, _SPACE_SCORE, _CHAR_SCORE = -1.0, -4.0, -8.0


def world_words(vocabulary: Iterable[str] = VOCABULARY) -> list[str]:
    """The alphabetic words of `vocabulary`, lowercased, sorted, without duplicates (digits and
    punctuation are single characters, which both tokenizers have anyway)."""
    return sorted({w.lower() for w in vocabulary if w.isalpha()})


def _byte_alphabet() -> list[str]:
    # the 256 printable stand-ins ByteLevel maps bytes to; sorted, so ids never depend on set order
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def learn_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges under which every word of `words` (plain ASCII letters) becomes one symbol.

    The classic BPE trainer, deterministic: each word counts once, the most frequent adjacent pair
    is merged next, ties go to the lexicographically smallest pair; it stops when every word is a
    single symbol. Encoding a training word with these merges in rank order replays the training.
    """
    corpus = [[*w[:-1], w[-1] + WORD_SUFFIX] for w in dict.fromkeys(words) if w]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for symbols in corpus for pair in pairwise(symbols))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for i, symbols in enumerate(corpus):
            out, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            corpus[i] = out


def build_clip_tokenizer(vocabulary: Iterable[str] = VOCABULARY, max_length: int = DEFAULT_MAX_LENGTH
                         ) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges make every world word one token (see module doc)."""
    words = world_words(vocabulary)
    alphabet = _byte_alphabet()
    tokens = [*alphabet, *(c + WORD_SUFFIX for c in alphabet)]
    merges = learn_merges(words)
    tokens += [a + b for a, b in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*tokens, CLIP_BOS, CLIP_EOS]))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    _check_single_tokens(tokenizer, words, lambda w: [w + WORD_SUFFIX])
    return tokenizer


def build_t5_tokenizer(vocabulary: Iterable[str] = VOCABULARY, max_length: int = DEFAULT_MAX_LENGTH
                       ) -> T5TokenizerFast:
    """A T5 Unigram tokenizer with one piece per world word (see module doc)."""
    words = world_words(vocabulary)
    chars = [c for c in string.printable if not c.isspace()]
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (T5_SPACE, _SPACE_SCORE)]
    pieces += [(T5_SPACE + w, _WORD_SCORE) for w in words]
    pieces += [(c, _CHAR_SCORE) for c in chars]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)
    _check_single_tokens(tokenizer, words, lambda w: [T5_SPACE + w])
    return tokenizer


def _check_single_tokens(tokenizer, words: Sequence[str], expected) -> None:
    # a merge or score mistake here would silently spell world words out: fail at build time
    wrong = [w for w in words if tokenizer.tokenize(w) != expected(w)]
    if wrong:
        raise RuntimeError(f"{type(tokenizer).__name__} does not keep these words whole: {wrong[:5]}")


__all__ = ["build_clip_tokenizer", "build_t5_tokenizer", "learn_merges", "world_words", "DEFAULT_MAX_LENGTH"]
