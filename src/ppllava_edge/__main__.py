"""`python -m ppllava_edge ...` = the `ppllava-edge` command (bench's cold-start probe runs it in a fresh process)."""
from ppllava_edge.cli.main import main

if __name__ == "__main__":
    main()
