"""`python -m lorakit ...` is the `lorakit` command."""

from .cli import main

raise SystemExit(main())
