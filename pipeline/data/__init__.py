"""Text in and tokens out: reading sources (sources/), the cleaning rules, exact and near-duplicate
indexes, sharded preparation, the QA set built from the corpus (qa), and the tokenizer with its
token files (tokenizer). Used by collect, clean and tokenize, and by later stages for the tokenizer."""
