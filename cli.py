"""`python cli.py ...` is the `kdcache` command (kdcache/cli.py), run from a checkout."""
from kdcache.cli import run

if __name__ == "__main__":
    run()
