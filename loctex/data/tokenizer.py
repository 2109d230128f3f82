"""``loctex tokenizer train``: a WordPiece tokenizer trained on narrative captions (DESIGN §2.3).

Lower-cased (BERT normalizer, accents stripped), split on whitespace and punctuation, special tokens
``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4``. ``Tokenizer.encode`` keeps character offsets into
the original caption; the saved file's post-processor wraps a caption as ``[CLS] caption [SEP]``, the
same ids :func:`encode_caption` and the data set produce.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)

_CAPTION = re.compile(rb'"caption"\s*:\s*"((?:[^"\\]|\\.)*)"')


def iter_captions(paths):
    """Captions of JSON Lines files, streamed. A cheap regex finds the caption of a line (no full
    parse of the ~20 KB trace); lines without one are skipped here (``prepare`` reports them)."""
    for path in paths:
        with open(path, "rb") as f:
            for raw in f:
                m = _CAPTION.search(raw)
                if m is None:
                    continue
                try:
                    yield json.loads(b'"' + m.group(1) + b'"')
                except ValueError:
                    continue


def new_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _set_post_processor(tok) -> None:
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])


def train_tokenizer(captions, vocab_size: int = 8000, min_frequency: int = 1):
    """Train on an iterable of caption strings; returns a ``tokenizers.Tokenizer``."""
    from tokenizers import trainers

    tok = new_tokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS, continuing_subword_prefix="##",
                                        show_progress=False)
    tok.train_from_iterator(captions, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, f"special token {s} must have id {i}"
    _set_post_processor(tok)
    return tok


def load_tokenizer(path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise ValueError(f"{path}: special token {s} must have id {i}")
    return tok


def encode_caption(tok, caption: str, max_tokens: int) -> list[int]:
    """``[CLS] caption [SEP]`` ids truncated to ``max_tokens`` (the [SEP] is kept) — exactly the
    ``tokens`` row the data set yields for an un-flipped caption."""
    ids = tok.encode(caption, add_special_tokens=False).ids[: max(0, max_tokens - 2)]
    return [CLS_ID, *ids, SEP_ID]


class CaptionEncoder:
    """Batch encoding for ``prepare``'s throughput: exactly what
    ``tok.encode_batch(captions, add_special_tokens=False)`` gives, faster.

    For printable-ASCII captions the tokenizer's own steps are simple: lower-case, split at
    whitespace and at every ASCII punctuation character, then WordPiece each word on its own. So the
    captions of a batch are split together with one regex, each distinct word is WordPiece'd once
    (through the tokenizer) into a word table, and the batch's tokens are gathered from that table
    with NumPy (no Python work per token). Other captions go through the tokenizer unchanged."""

    _PIECES = re.compile(r"[A-Za-z0-9]+|[!-/:-@\[-`{-~]")
    _PRINTABLE = re.compile(r"[ -~\t\n\r]*")
    # The same split as _PIECES, per byte: a piece starts at every punctuation character and at
    # the first character of every letter/digit run (everything else is whitespace).
    _ALNUM = np.zeros(256, bool)
    _ALNUM[[c for c in range(128) if chr(c).isalnum()]] = True
    _PUNCT = np.zeros(256, bool)
    _PUNCT[[c for c in range(33, 127) if not chr(c).isalnum()]] = True

    _PROBE = "A Dog's (RED) hat -- at 12.5 top-left; x\tY!"

    def __init__(self, tok, max_cache: int = 500_000):
        self.tok, self.max_cache = tok, max_cache
        self._reset()
        # Only for tokenizers built like ours (a user's --tokenizer may be cased, or split
        # differently): check the parts, then a probe through both paths.
        self.enabled = (type(tok.normalizer).__name__ == "BertNormalizer"
                        and getattr(tok.normalizer, "lowercase", False)
                        and type(tok.pre_tokenizer).__name__ == "BertPreTokenizer"
                        and type(tok.model).__name__ == "WordPiece")
        if self.enabled:
            enc = tok.encode(self._PROBE, add_special_tokens=False)
            self.enabled = self.encode_batch([self._PROBE])[0] == (enc.ids, enc.offsets)

    def _reset(self) -> None:
        """Empty word table: word -> row; per row its token count and first token; per token its
        id and (start, end) inside the word."""
        self.rows: dict = {}
        self.word_ntok = np.zeros(0, np.int64)
        self.word_first = np.zeros(0, np.int64)
        self.tok_ids = np.zeros(0, np.int32)
        self.tok_offsets = np.zeros((0, 2), np.int64)

    def _add_words(self, words: list) -> None:
        # one at a time: new words are few after the first batches, and encode_batch would wake
        # the tokenizer's thread pool for them
        encs = [self.tok.encode(w, add_special_tokens=False) for w in words]
        ntok = np.array([len(e.ids) for e in encs], np.int64)
        for w in words:
            self.rows[w] = len(self.rows)
        # Growing by concatenation copies the table once per batch with new words: ~1 MB for a
        # COCO-sized vocabulary, small next to the batch's own work.
        self.word_first = np.concatenate([self.word_first,
                                          len(self.tok_ids) + np.cumsum(ntok) - ntok])
        self.word_ntok = np.concatenate([self.word_ntok, ntok])
        self.tok_ids = np.concatenate([self.tok_ids] + [np.array(e.ids, np.int32) for e in encs])
        self.tok_offsets = np.concatenate(
            [self.tok_offsets] + [np.array(e.offsets, np.int64).reshape(-1, 2) for e in encs])

    def _encode_ascii(self, captions: list[str]):
        """encode_flat for printable-ASCII captions."""
        text = "\n".join(captions).lower()  # the separator is whitespace: no piece crosses it
        words = self._PIECES.findall(text)
        b = np.frombuffer(text.encode("ascii"), np.uint8)
        alnum = self._ALNUM[b]
        after_alnum = np.zeros(len(b), bool)
        after_alnum[1:] = alnum[:-1]
        starts = np.flatnonzero(self._PUNCT[b] | (alnum & ~after_alnum))
        assert len(starts) == len(words), "piece split out of step with _PIECES"
        rows = list(map(self.rows.get, words))
        if None in rows:
            new = list(dict.fromkeys(w for w, r in zip(words, rows) if r is None))
            if len(self.rows) + len(new) > self.max_cache:  # bound the memory: start over
                self._reset()
                new = list(dict.fromkeys(words))
            self._add_words(new)
            rows = list(map(self.rows.__getitem__, words))
        rows = np.array(rows, np.int64)
        cap_start = np.cumsum([0] + [len(c) + 1 for c in captions[:-1]])
        owner = np.searchsorted(cap_start, starts, side="right") - 1
        ntok = self.word_ntok[rows]
        # token k of piece p is row word_first[rows[p]] + k of the token table
        piece_first = np.cumsum(ntok) - ntok
        idx = np.repeat(self.word_first[rows] - piece_first, ntok) + np.arange(int(ntok.sum()))
        offsets = self.tok_offsets[idx] + np.repeat(starts - cap_start[owner], ntok)[:, None]
        per_caption = np.bincount(owner, weights=ntok, minlength=len(captions)).astype(np.int64)
        return self.tok_ids[idx], offsets, per_caption

    def encode_flat(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All tokens of the captions on flat arrays: ids int32 [T], character offsets int64 [T,2]
        (into each token's own caption), tokens per caption int64 [N]."""
        if not captions:
            return np.zeros(0, np.int32), np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
        joined = "\n".join(captions)
        if self.enabled and joined.isascii() and self._PRINTABLE.fullmatch(joined):
            return self._encode_ascii(captions)  # the common case: the whole batch at once
        fast = [k for k, cap in enumerate(captions) if self.enabled and cap.isascii()
                and self._PRINTABLE.fullmatch(cap)]
        parts: list = [None] * len(captions)
        if fast:
            ids, offsets, ntok = self._encode_ascii([captions[k] for k in fast])
            cut = np.cumsum(ntok)[:-1]
            for k, i, o in zip(fast, np.split(ids, cut), np.split(offsets, cut)):
                parts[k] = (i, o)
        other = [k for k in range(len(captions)) if parts[k] is None]
        for k, enc in zip(other, self.tok.encode_batch([captions[k] for k in other],
                                                       add_special_tokens=False)):
            parts[k] = (np.array(enc.ids, np.int32),
                        np.array(enc.offsets, np.int64).reshape(-1, 2))
        return (np.concatenate([i for i, _ in parts]), np.concatenate([o for _, o in parts]),
                np.array([len(i) for i, _ in parts], np.int64))

    def encode_batch(self, captions: list[str]) -> list[tuple[list, list]]:
        """(ids, offsets) per caption, as lists: ``encode_flat`` split up."""
        ids, offsets, ntok = self.encode_flat(captions)
        cut = np.cumsum(ntok)[:-1]
        return [(i.tolist(), [tuple(o) for o in off.tolist()])
                for i, off in zip(np.split(ids, cut), np.split(offsets, cut))]


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    p = sub.add_parser("train", help="train a WordPiece tokenizer on the captions of narrative files")
    p.add_argument("--narratives", nargs="+", required=True, help="Localized Narratives .jsonl files")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--min-frequency", type=int, default=1)
    p.add_argument("--out", required=True, help="tokenizer.json to write")


def main(args) -> int:
    if args.tokenizer_command != "train":  # pragma: no cover - argparse enforces it
        raise SystemExit(f"unknown tokenizer action {args.tokenizer_command}")
    for p in args.narratives:
        if not Path(p).is_file():
            raise SystemExit(f"loctex tokenizer train: no such file: {p}")
    tok = train_tokenizer(iter_captions(args.narratives), args.vocab_size, args.min_frequency)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out))
    print(f"tokenizer: {tok.get_vocab_size()} tokens -> {args.out}")
    return 0
