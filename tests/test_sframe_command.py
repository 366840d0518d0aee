import json
from pathlib import Path

import pytest

from client.cli import main

VECTORS = json.loads((Path(__file__).parent / "vectors/sframe/test-vectors.json").read_text())
SFRAME = VECTORS["sframe"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["sframe", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def key_args(case) -> list[str]:
    return ["--suite", str(case["cipher_suite"]), "--key", case["base_key"]]


@pytest.mark.parametrize("case", SFRAME, ids=lambda c: str(c["cipher_suite"]))
def test_protect_reproduces_vector(capsys, case):
    argv = [*key_args(case), "--kid", str(case["kid"]), "--ctr", str(case["ctr"])]
    result = run(capsys, "protect", *argv, "--metadata", case["metadata"], case["pt"])
    assert result == (0, case["ct"] + "\n", "")


@pytest.mark.parametrize("case", SFRAME, ids=lambda c: str(c["cipher_suite"]))
def test_unprotect_reproduces_vector(capsys, case):
    result = run(capsys, "unprotect", *key_args(case), "--metadata", case["metadata"], case["ct"])
    assert result == (0, case["pt"] + "\n", "")


def test_inspect(capsys):
    case = SFRAME[0]
    tail = len(case["ct"]) // 2 - 5
    assert run(capsys, "inspect", case["ct"]) == (
        0,
        f"kid=291 ctr=17767 header_length=5 ciphertext_length={tail}\n",
        "",
    )
    assert run(capsys, "inspect", "00")[1] == "kid=0 ctr=0 header_length=1 ciphertext_length=0\n"


def test_hex_kid_and_ctr_accepted(capsys):
    case = SFRAME[3]
    argv = [*key_args(case), "--kid", "0x123", "--ctr", "0x4567", "--metadata", case["metadata"]]
    assert run(capsys, "protect", *argv, case["pt"])[1] == case["ct"] + "\n"


CASE = SFRAME[3]
GOOD_KEY = key_args(CASE)
PROTECT = ["protect", *GOOD_KEY, "--kid", "1", "--ctr", "0"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["inspect", "zz"], "inspect: error: HEX is not valid hex"),
        (["inspect", ""], "inspect: MalformedHeaderError: empty input"),
        (["inspect", "99"], "inspect: MalformedHeaderError: truncated SFrame header"),
        (["inspect", "8005"], "inspect: MalformedHeaderError: SFrame header KID is not minimally"),
        ([*PROTECT, "xyz"], "protect: error: PLAINTEXT_HEX is not valid hex"),
        (["protect", "--suite", "9", "--key", "00", "--kid", "1", "--ctr", "0", "00"], "--suite"),
        (
            ["protect", "--suite", "four", "--key", "00", "--kid", "1", "--ctr", "0", "00"],
            "--suite",
        ),
        (["protect", *GOOD_KEY, "--kid", "-1", "--ctr", "0", "00"], "error: --kid must be in"),
        (["protect", *GOOD_KEY, "--kid", "1", "--ctr", str(2**64), "00"], "--ctr must be in"),
        (["protect", *GOOD_KEY, "--kid", "one", "--ctr", "0", "00"], "--kid must be an integer"),
        (
            ["protect", "--suite", "4", "--key", "0001", "--kid", "1", "--ctr", "0", "00"],
            "protect: SFrameUsageError: base key must be at least 16 bytes",
        ),
        (["unprotect", *GOOD_KEY, CASE["ct"]], "unprotect: AuthenticationError"),  # no metadata
        (
            ["unprotect", *GOOD_KEY, "--metadata", CASE["metadata"], CASE["ct"][:-2]],
            "unprotect: AuthenticationError",
        ),
        (["unprotect", *GOOD_KEY, "--metadata", "q", CASE["ct"]], "error: --metadata is not"),
    ],
)
def test_bad_input_is_one_line_on_stderr(capsys, argv, expected):
    code, out, err = run(capsys, *argv)
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith("blindhub sframe ")
    assert expected in err
    assert CASE["base_key"] not in err


def test_missing_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sframe", "protect", "--suite", "4", "00"])
    assert exit_info.value.code == 2
