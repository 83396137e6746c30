"""The argument parser of bigan's commands: a bad flag is one line naming it (exit 2), not usage text."""
import argparse
import sys


class Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
