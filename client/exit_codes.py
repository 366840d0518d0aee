"""The exit status of every ``blindhub`` command: one table, documented once
(docs/reference/cli.md). A number means the same thing whichever command returns it."""

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    BAD_INPUT = 1  # sframe: input data that does not parse, or a frame that does not decrypt
    USAGE = 2  # a bad argument or option (argparse's own status, and the hub's bad limits)
    HUB_UNREACHABLE = 3  # call: the hub could not be reached or refused the join
    VERIFICATION_REFUSED = 4  # call: the SAS was declined, or --verify pinned met an unknown peer
    IDENTITY_MISMATCH = 5  # call: a pinned name presented another identity key
    CALL_FAILED = 6  # call: setup, key agreement or the connection failed
    # A local file, port or device: unreadable identity, pin or certificate files, a port in
    # use, a directory that cannot be written, a --send device that cannot be opened, no
    # passphrase to be had
    LOCAL_PROBLEM = 7
    UNKNOWN_CONTACT = 8  # contacts: no pin for that name
    EXPERIMENT_INVALID = 9  # demo: the control was not intercepted, so the run proves nothing
    EXPERIMENT_UNEXPECTED = 10  # demo: a protected cell did not come out as claimed
    WRONG_PEER = 11  # call: the peer signed another name than --peer NAME, or our own key
    HUB_NOT_TRUSTED = 12  # call: the wss:// hub's certificate did not verify (see --hub-ca)
    INTERNAL_ERROR = 70  # any: a bug (an unexpected exception); as sysexits.h's EX_SOFTWARE
    INTERRUPTED = 130  # any: Ctrl-C outside a call (128 + SIGINT, as a shell reports it)
