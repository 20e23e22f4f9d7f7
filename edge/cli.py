"""anycast-edge entry point."""


def main() -> None:
    raise SystemExit(2)
