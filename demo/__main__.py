from demo.train import main

raise SystemExit(main())
