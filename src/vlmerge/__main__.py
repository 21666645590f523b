from vlmerge.cli.main import main

raise SystemExit(main())
