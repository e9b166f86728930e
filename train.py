"""Train Piggyback masks: `python train.py` runs the offline demo; see README.md."""

from piggyback.train import main

if __name__ == "__main__":
    main()
