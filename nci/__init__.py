"""The ``nci`` command line: one entry point with a subcommand group per role."""

__all__: list[str] = []
