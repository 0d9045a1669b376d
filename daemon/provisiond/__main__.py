from provisiond.cli.main import main

raise SystemExit(main())
