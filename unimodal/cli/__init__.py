"""The `unimodal` command: argument parsing (`main`), subcommands, the demo and experiment sweeps."""
