"""The `lorakit` subcommands other than train: chat, eval, merge/export (one module each, plus their settings)."""
