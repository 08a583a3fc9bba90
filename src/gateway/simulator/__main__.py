"""Entry point for ``python -m gateway.simulator``."""

from gateway.simulator.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
