"""Command line entry point (filled in by the training issue)."""


def main() -> None:
    raise SystemExit("sslens CLI is being built")
