import sys

from .early import start_for

start_for(sys.argv[1:])  # before the command line's imports: run's fork server starts at once

from .cli import main  # noqa: E402

main()
