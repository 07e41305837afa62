"""Argument helpers shared by the `ant` subcommands."""
import argparse


def positive_int(text: str) -> int:
    """argparse type of --threads: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value
