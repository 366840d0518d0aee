"""Sans-I/O cryptography for blindhub: SFrame, identities, the call key agreement.

Nothing in this package opens a socket, reads a clock or starts an event loop:
randomness and time are parameters, so every function can be checked with vectors.
"""
