"""``python -m dot_proxy``."""

from dot_proxy.cli import main

if __name__ == "__main__":
    main()
