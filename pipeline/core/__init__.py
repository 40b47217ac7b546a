"""What every layer shares: the user-facing error and atomic I/O (common), the params schema with
the model's config (params), the output paths (paths), and language codes (languages)."""
