"""`python -m gptjax.cli ...`: the `gptjax` command."""

from gptjax.cli import main

raise SystemExit(main())
