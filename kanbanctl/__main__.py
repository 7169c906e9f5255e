from kanbanctl.cli import main

raise SystemExit(main())
