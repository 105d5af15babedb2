"""Training data, in the order a run reads it:

- corpora: documents from the running Python's stdlib, local text or a downloaded corpus, split by document
  into training and validation;
- tokens: the tokenizer (bytes or a freshly trained byte-level BPE) and the documents encoded once into a
  memory-mapped token file;
- batches: seeded random windows whose generator state can be checkpointed, the fixed evaluation windows, and
  the metrics a loss is reported in.

No JAX here: everything is NumPy and files.
"""

from gptjax.data.batches import (
    Batcher,
    bits_per_byte,
    eval_batches,
    eval_windows,
    shard,
    unigram_entropy,
    validation_tokens,
)
from gptjax.data.corpora import (
    DOWNLOADS,
    SEPARATOR,
    STDLIB_SKIP_DIRS,
    STDLIB_SKIP_PREFIXES,
    Doc,
    default_cache_dir,
    download_corpus,
    local_corpus,
    resolve_corpus,
    split_docs,
    stdlib_corpus,
)
from gptjax.data.tokens import (
    BPE_MAX,
    BPE_MIN,
    BPE_TRAIN_CAP_BYTES,
    TOKENS_FORMAT,
    RunData,
    atomic_file,
    corpus_bytes,
    corpus_hash,
    encode_to_memmap,
    load_tokens,
    make_tokenizer,
    prepare_run_data,
    read_token_meta,
    token_dtype,
    tokenizer_fingerprint,
    train_bpe,
    write_atomic,
)

__all__ = ["BPE_MAX", "BPE_MIN", "BPE_TRAIN_CAP_BYTES", "DOWNLOADS", "SEPARATOR", "STDLIB_SKIP_DIRS",
           "STDLIB_SKIP_PREFIXES", "TOKENS_FORMAT", "Batcher", "Doc", "RunData", "atomic_file", "bits_per_byte",
           "corpus_bytes", "corpus_hash", "default_cache_dir", "download_corpus", "encode_to_memmap", "eval_batches",
           "eval_windows", "load_tokens", "local_corpus", "make_tokenizer", "prepare_run_data", "read_token_meta",
           "resolve_corpus", "shard", "split_docs", "stdlib_corpus", "token_dtype", "tokenizer_fingerprint",
           "train_bpe", "unigram_entropy", "validation_tokens", "write_atomic"]
