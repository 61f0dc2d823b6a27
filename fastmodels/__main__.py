from fastmodels.cli import main

raise SystemExit(main())
