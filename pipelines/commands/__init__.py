"""CLI subcommands: every module here defines ``register(subparsers)``; the CLI discovers them."""
