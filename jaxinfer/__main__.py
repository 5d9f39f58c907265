from jaxinfer.cli import main

raise SystemExit(main())
