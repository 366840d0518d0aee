"""The group-call benchmark's readings of ``/proc`` and ``/metrics`` (tests/bench/group.py)."""

import os

from tests.bench.group import machine_ticks, media_counter, parse_metrics, process_cpu_seconds

# A real /proc/PID/stat line, with a command name that holds a space and a parenthesis.
STAT = (
    "4242 (python (hub) x) S 1 4242 4242 0 -1 4194560 13000 0 12 0 "
    "250 75 0 0 20 0 3 0 123456 500000000 30000 18446744073709551615 1 1 0 0 0 0 0 "
    "16781312 17922 0 0 0 17 1 0 0 0 0 0"
)


def test_process_cpu_is_user_plus_system_time():
    # utime 250 and stime 75 ticks, whatever the command name holds.
    assert process_cpu_seconds(STAT, ticks_per_second=100) == 3.25


def test_process_cpu_of_this_process_grows():
    with open(f"/proc/{os.getpid()}/stat") as stat:
        before = process_cpu_seconds(stat.read())
    sum(i * i for i in range(300_000))
    with open(f"/proc/{os.getpid()}/stat") as stat:
        assert process_cpu_seconds(stat.read()) >= before


def test_machine_ticks_count_all_but_idle_and_iowait():
    text = "cpu  100 5 50 800 40 3 2 0 7 0\ncpu0 50 2 25 400 20 1 1 0 0 0\nintr 12345\n"
    # guest (7) is part of user already; idle 800 and iowait 40 are not busy.
    assert machine_ticks(text) == (160, 1000)


def test_machine_ticks_of_this_machine():
    with open("/proc/stat") as stat:
        busy, total = machine_ticks(stat.read())
    assert 0 <= busy <= total


def test_metrics_are_read_by_name_and_labels():
    text = (
        "# HELP blindhub_media_subscribers Members of routed rooms whose media is connected.\n"
        "# TYPE blindhub_media_subscribers gauge\n"
        "blindhub_media_subscribers 4\n"
        'blindhub_media_frames_forwarded_total{kind="audio"} 1200\n'
        'blindhub_media_frames_forwarded_total{kind="video"} 720\n'
        "\n"
    )
    metrics = parse_metrics(text)
    assert metrics["blindhub_media_subscribers"] == 4
    assert media_counter(metrics, "frames_forwarded", "video") == 720
    assert media_counter(metrics, "frames_dropped", "audio") == 0  # absent reads as none
