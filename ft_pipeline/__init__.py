"""The application shell: the `ft-pipeline` command, wiring the CLI to the flows."""
