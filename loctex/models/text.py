"""Textual backbone: a BERT-style transformer encoder trained from scratch.

Built from a ``transformers.BertConfig`` filled from our config (layers, width, heads, FFN size,
max positions, dropout) and the tokenizer's vocabulary size; nothing is downloaded. It returns the
per-token features ``[B, L, width]`` (queries of the cross-modal attention) and a caption vector.

The caption vector is the *masked mean* of the token features, not the ``[CLS]`` output: the
tokenizer is trained on our captions by ``loctex tokenizer`` and the model must not depend on
which special tokens it adds, and with a shallow encoder trained from scratch the mean over real
tokens gives every token's features a direct gradient from the contrastive loss.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # loctex.config imports the backbone registry from here
    from loctex.config import TextConfig


def bert_config(cfg: TextConfig, vocab_size: int, pad_token_id: int = 0):
    from transformers import BertConfig
    if cfg.width % cfg.heads:
        raise ValueError(f"model.text.width={cfg.width} is not divisible by model.text.heads={cfg.heads}")
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.width,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.width * cfg.ffn_mult,
        max_position_embeddings=cfg.max_positions,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        type_vocab_size=1,
        pad_token_id=pad_token_id,
    )


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, vocab_size: int, pad_token_id: int = 0):
        super().__init__()
        from transformers import BertModel
        self.config = bert_config(cfg, vocab_size, pad_token_id)
        self.bert = BertModel(self.config, add_pooling_layer=False)
        self.width = cfg.width
        self.max_positions = cfg.max_positions

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens int64 [B, L], attention_mask bool [B, L] -> (features [B, L, W], caption [B, W])."""
        if tokens.shape[1] > self.max_positions:
            raise ValueError(f"captions have {tokens.shape[1]} tokens but model.text.max_positions="
                             f"{self.max_positions}; raise it or lower data.max_tokens")
        mask = attention_mask.bool()
        feats = self.bert(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        return feats, masked_mean(feats, mask)


def masked_mean(feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``feats`` [B, L, W] over the positions where ``mask`` [B, L] is True (0 if none).
    Summed in float32 (bf16 sums over ~100 tokens lose digits), returned in ``feats``' dtype."""
    m = mask.float().unsqueeze(-1)
    return ((feats.float() * m).sum(1) / m.sum(1).clamp_min(1.0)).to(feats.dtype)
