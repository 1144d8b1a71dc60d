"""``python -m aivvm_batch.serve``: the serve command on its own."""

from .cli import serve

serve(prog_name="aivvm-batch serve")
