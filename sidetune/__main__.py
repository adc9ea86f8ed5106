"""`python -m sidetune ...` (and `torchrun -m sidetune ...`) run the command-line interface."""

from cli.main import main

if __name__ == "__main__":
    main()
