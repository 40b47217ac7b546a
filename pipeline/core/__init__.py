"""What every layer shares: the user-facing error and atomic I/O (common), the params schema
(params), the output paths (paths), and language codes (languages)."""
