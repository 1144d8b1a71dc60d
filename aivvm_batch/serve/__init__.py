"""``aivvm-batch serve``: the OpenAI-compatible files and batches API, and a page to watch batches."""
