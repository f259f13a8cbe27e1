"""``python -m ganflow`` (also what ``torchrun -m ganflow`` runs)."""

from .cli import main

if __name__ == "__main__":
    main()
