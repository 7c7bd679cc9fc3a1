"""``python -m hsm_ca``."""

from hsm_ca.cli import main

if __name__ == "__main__":
    main()
