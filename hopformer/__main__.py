from hopformer.cli import main

raise SystemExit(main())
