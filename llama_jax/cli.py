"""`llama-jax` command line. Prints only what was asked for on stdout; progress and logs go to
stderr. Bad input ends with one line on stderr and exit code 2.

Each subcommand has its own section below: `add_<name>(subparsers)` declares its arguments and
`run_<name>(args)` carries it out.
"""

from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Subcommands are registered here, in the order `llama-jax --help` lists them.

COMMANDS: list = []


def command(add):
    COMMANDS.append(add)
    return add


# === generate / chat (generation) ===

# === convert / export (conversion) ===

# === plan (sharding) ===

# === train / finetune (training) ===

# === quantize (quantization) ===

# === eval (evaluation) ===

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama-jax", description="LLaMA-family models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"llama-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llama-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
