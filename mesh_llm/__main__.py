"""`python -m mesh_llm` runs the command-line interface."""

from mesh_llm.cli import main

raise SystemExit(main())
