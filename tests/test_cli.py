import json
import logging
import socket
import subprocess
import sys

import pytest

from client.cli import COMMANDS, main
from client.hub_command import media_server
from signaling.hub import Limits
from signaling.media_routing import RetransmitBudget, SendOffer
from signaling.protocol import PeerId


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: blindhub" in capsys.readouterr().err


def test_help_lists_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "client.cli", "--help"], capture_output=True, text=True, check=True
    )
    for name in COMMANDS:
        assert name in result.stdout


PRODUCT_COMMANDS = [name for name in COMMANDS if name != "demo"]
# Runs each command's --help in one fresh interpreter and reports on stderr (the help goes to
# stdout) whether the experiment's plotting library is loaded after each.
LOADS_MATPLOTLIB = """
import json, sys
from client.cli import main
loaded = {}
for name in sys.argv[1:]:
    try:
        main([name, "--help"])
    except SystemExit:
        pass
    loaded[name] = "matplotlib" in sys.modules
print(json.dumps(loaded), file=sys.stderr)
"""


def test_no_product_command_loads_the_plotting_library():
    assert set(PRODUCT_COMMANDS) == {"call", "hub", "id", "contacts", "sframe", "web"}
    # demo last, as the control: its figure needs matplotlib, so the check does see it.
    result = subprocess.run(
        [sys.executable, "-c", LOADS_MATPLOTLIB, *PRODUCT_COMMANDS, "demo"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stderr) == {**dict.fromkeys(PRODUCT_COMMANDS, False), "demo": True}


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--retransmit-rate", "10"], "--retransmit-rate and -burst need --route-media"),
        (["--route-media", "--retransmit-burst", "0"], "the retransmission rate and burst must"),
        (["--route-media", "--retransmit-rate", "-1"], "the retransmission rate and burst must"),
    ],
    ids=["without-route-media", "burst-0", "negative-rate"],
)
def test_the_hubs_retransmission_budget_is_checked(capsys, flags, error):
    assert main(["hub", "--port", "0", *flags]) == 2
    assert f"blindhub hub: {error}" in capsys.readouterr().err


def test_the_hubs_retransmission_budget_reaches_its_media_router():
    media = media_server(Limits(), None, RetransmitBudget(rate_per_second=1.0, rate_burst=3))
    router = media.router
    (offer,) = router.join(PeerId("a"), "room", 0.0)
    assert isinstance(offer, SendOffer)
    router.answer(PeerId("a"), "sdp")
    router.answer_applied(PeerId("a"), offer.session, 0.0)
    assert router.retransmissions_wanted(PeerId("a"), 10, 0.0) == 3
    assert router.retransmissions_wanted(PeerId("a"), 10, 2.0) == 2


@pytest.mark.parametrize(
    ("flags", "code"),
    [
        (["--route-media", "--redis", "nope://redis.internal"], 2),
        (["--record-metadata", "/nonexistent/metadata.jsonl"], 7),
        (["--port", "{taken}"], 7),
    ],
    ids=["bad-redis-url", "unwritable-metadata", "port-taken"],
)
def test_a_hub_that_does_not_serve_leaves_logging_as_it_found_it(flags, code):
    # The command also runs inside other processes (the tests'): a hub that stops on an error
    # must not leave a handler writing to a stderr that has since been closed.
    hub_logger = logging.getLogger("blindhub.hub")
    before = (list(hub_logger.handlers), hub_logger.level)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        argv = [flag.replace("{taken}", port) for flag in flags]
        assert main(["hub", "--host", "127.0.0.1", "--port", "0", *argv]) == code
    assert (list(hub_logger.handlers), hub_logger.level) == before
