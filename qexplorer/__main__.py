from qexplorer.cli import main

raise SystemExit(main())
