"""`python -m droidspeak.launch_server --model-path ... --host ... --port ...` (as SGLang)."""
import sys

from droidspeak.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
