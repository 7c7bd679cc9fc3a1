"""``python -m hsm_ca``."""

from hsm_ca.entry import main

if __name__ == "__main__":
    main()
