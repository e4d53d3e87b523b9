from nci.cli import main

raise SystemExit(main())
