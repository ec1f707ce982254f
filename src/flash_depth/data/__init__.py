"""Text sources, tokenizers and token batches for training and evaluation."""

from .sources import load_documents, load_token_shards
from .tokenizer import EOT, BPETokenizer, ByteTokenizer, load_tokenizer, train_bpe

__all__ = ["EOT", "BPETokenizer", "ByteTokenizer", "load_documents", "load_token_shards", "load_tokenizer", "train_bpe"]
