from polyhead.cli import main

raise SystemExit(main())
