"""`python -m glmcode` runs the CLI."""

from glmcode.cli import main

if __name__ == "__main__":
    main()
