"""`python -m vlmerge ...` (and `torchrun -m vlmerge ...`)."""

from vlmerge.cli.main import main

raise SystemExit(main())
