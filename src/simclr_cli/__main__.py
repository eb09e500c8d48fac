"""`python -m simclr_cli` runs the same command line as `simclr`."""

from simclr_cli.cli.app import main

if __name__ == "__main__":
    main()
