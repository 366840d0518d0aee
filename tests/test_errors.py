"""The project's exceptions: one name each, each under the base its package documents."""

import importlib
import inspect
import pkgutil

import client
import crypto
import signaling
from client.hub_connection import HubClosed, PayloadTooLarge, UnexpectedHubMessage
from client.session import CallError
from crypto.errors import CryptoError, LocalError, RemoteError
from crypto.sframe import SFrameError
from signaling.protocol import MalformedHubMessage, Refused, SignalingError


def our_exceptions() -> dict[str, list[type[BaseException]]]:
    """Every exception class defined in client/, crypto/ and signaling/, by name."""
    found: dict[str, list[type[BaseException]]] = {}
    for package in (client, crypto, signaling):
        for module_info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            module = importlib.import_module(module_info.name)
            for _, value in inspect.getmembers(module, inspect.isclass):
                if issubclass(value, BaseException) and value.__module__ == module.__name__:
                    found.setdefault(value.__name__, []).append(value)
    return found


def test_every_exception_name_is_unique_across_the_packages():
    found = our_exceptions()
    assert len(found) > 30  # the walk found the project's errors
    assert {name: classes for name, classes in found.items() if len(classes) > 1} == {}


def test_crypto_errors_are_remote_or_local():
    # The two bases that span both sides: every other crypto error is one or the other.
    bases = (CryptoError, SFrameError)
    for name, [error] in our_exceptions().items():
        if error.__module__.startswith("crypto.") and error not in bases:
            assert issubclass(error, RemoteError | LocalError), name


def test_signalling_errors_are_under_their_base_and_the_right_builtin():
    for error in (MalformedHubMessage, Refused, UnexpectedHubMessage, HubClosed, PayloadTooLarge):
        assert issubclass(error, SignalingError)
    # A closed connection is not bad input; bad input is still a ValueError.
    assert issubclass(HubClosed, ConnectionError) and not issubclass(HubClosed, ValueError)
    assert issubclass(MalformedHubMessage, ValueError)
    assert issubclass(UnexpectedHubMessage, ValueError)
    assert not issubclass(CallError, ValueError | SignalingError | CryptoError)
