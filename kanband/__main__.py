from kanband.daemon import main

raise SystemExit(main())
