"""The `vlmerge` command line: one thin subcommand per verb."""
