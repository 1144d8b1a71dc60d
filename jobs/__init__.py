"""The batch: records, their JSONL forms, and the Redis store that holds them.

This package never imports the runtime (``worker``); the runtime imports it.
"""
