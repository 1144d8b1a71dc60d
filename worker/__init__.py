"""The runtime: providers that stream completions, the completion of one item,
and the thin Celery tasks that run it. Depends on ``jobs``, never the reverse."""
