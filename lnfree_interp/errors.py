"""The library's single exception type."""


class LNFreeError(Exception):
    """Raised for every problem the library detects in its input.

    The message names the problem and how to fix it. Library code never raises a bare
    ``ValueError`` or ``KeyError`` for user input; it raises this (chained to the original
    exception where there is one).
    """
