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
    """``encode_batch`` with a per-word cache, for ``prepare``'s throughput: (ids, offsets) per
    caption, exactly what ``tok.encode_batch(captions, add_special_tokens=False)`` gives.

    For printable-ASCII captions the tokenizer's own steps are simple: lower-case, split at
    whitespace and at every ASCII punctuation character, then WordPiece each word on its own. So a
    caption is split here with one regex and each distinct word is WordPiece'd once (through the
    tokenizer) and then looked up. Other captions go through the tokenizer unchanged."""

    _PIECES = re.compile(r"[A-Za-z0-9]+|[!-/:-@\[-`{-~]")
    _PRINTABLE = re.compile(r"[ -~\t\n\r]*")

    _PROBE = "A Dog's (RED) hat -- at 12.5 top-left; x\tY!"

    def __init__(self, tok, max_cache: int = 500_000):
        self.tok, self.max_cache = tok, max_cache
        self.cache: dict = {}
        # Only for tokenizers built like ours (a user's --tokenizer may be cased, or split
        # differently): check the parts, then a probe through both paths.
        self.enabled = (type(tok.normalizer).__name__ == "BertNormalizer"
                        and getattr(tok.normalizer, "lowercase", False)
                        and type(tok.pre_tokenizer).__name__ == "BertPreTokenizer"
                        and type(tok.model).__name__ == "WordPiece")
        if self.enabled:
            enc = tok.encode(self._PROBE, add_special_tokens=False)
            self.enabled = self.encode_batch([self._PROBE])[0] == (enc.ids, enc.offsets)

    def _word(self, word: str):
        hit = self.cache.get(word)
        if hit is None:
            enc = self.tok.encode(word, add_special_tokens=False)
            hit = (enc.ids, enc.offsets)
            if len(self.cache) < self.max_cache:
                self.cache[word] = hit
        return hit

    def encode_batch(self, captions: list[str]) -> list[tuple[list, list]]:
        out: list = [None] * len(captions)
        other = []
        for k, cap in enumerate(captions):
            if not (getattr(self, "enabled", True) and cap.isascii()
                    and self._PRINTABLE.fullmatch(cap)):
                other.append(k)
                continue
            ids: list = []
            offsets: list = []
            low = cap.lower()
            for m in self._PIECES.finditer(low):
                wids, woffs = self._word(m.group())
                s = m.start()
                ids.extend(wids)
                offsets.extend([(s + a, s + b) for a, b in woffs])
            out[k] = (ids, offsets)
        if other:
            for k, enc in zip(other, self.tok.encode_batch([captions[k] for k in other],
                                                           add_special_tokens=False)):
                out[k] = (enc.ids, enc.offsets)
        return out


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
