"""Writing text with a trained model: greedy, sampled and beam decoding (decode), and answering
questions (answer). Used by evaluate and `python -m pipeline.generate`."""
