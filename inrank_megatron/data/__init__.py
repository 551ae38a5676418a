"""Offline training data: corpora, tokenizers, preprocessing to Megatron indexed datasets, and the
train/valid/test GPT datasets built on them.

    corpus.py           documents from the Wikipedia sample in gensim, text files, JSON Lines
    tokenizers.py       Tokenizer: SentencePiece and exact GPT-2 BPE (tiktoken, offline)
    train_tokenizer.py  train a SentencePiece BPE model      (tools/train_tokenizer.py)
    preprocess.py       text -> <prefix>_text_document.bin/.idx + <prefix>.tokenizer.json
                                                               (tools/preprocess_data.py)
    datasets.py         build_gpt_datasets: megatron.core GPTDataset splits, with checks

The modules here import megatron.core (seconds) inside the functions that need it, not at import.
"""

from inrank_megatron.data.corpus import iter_documents, jsonl_documents, text_file_documents
from inrank_megatron.data.corpus import wiki_articles
from inrank_megatron.data.datasets import GPTDatasets, build_gpt_datasets, check_data
from inrank_megatron.data.preprocess import PreprocessResult, preprocess
from inrank_megatron.data.tokenizers import GPT2Tokenizer, SentencePieceTokenizer, Tokenizer
from inrank_megatron.data.tokenizers import build_tokenizer
from inrank_megatron.data.train_tokenizer import train_sentencepiece

__all__ = [
    "GPT2Tokenizer",
    "GPTDatasets",
    "PreprocessResult",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_gpt_datasets",
    "build_tokenizer",
    "check_data",
    "iter_documents",
    "jsonl_documents",
    "preprocess",
    "text_file_documents",
    "train_sentencepiece",
    "wiki_articles",
]
