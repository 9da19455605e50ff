"""``python -m experiments``: the main job (:mod:`experiments.main`)."""

from experiments.main import main

if __name__ == "__main__":
    main()
