"""edgectl entry point (the commands arrive with the lab/CLI issue)."""

import sys


def main() -> None:
    print("edgectl: no commands yet", file=sys.stderr)
    sys.exit(2)
