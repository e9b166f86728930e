"""Evaluate task artifacts: `python evaluate.py` reports on the demo's runs; see README.md."""

from piggyback.evaluate import main

if __name__ == "__main__":
    main()
