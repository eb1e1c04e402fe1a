from moemerge.cli import main

raise SystemExit(main())
