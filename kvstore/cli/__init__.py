"""Command-line entry points: `kvstore` (serve, dev) and `kvctl`."""
