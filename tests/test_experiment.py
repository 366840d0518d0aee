"""The interception experiment, run for real once (every cell a real call through a real hostile
hub), each cell asserted from its measured figures, never from its verdict string."""

import asyncio
import dataclasses
import itertools
import json
import wave
from html.parser import HTMLParser
from typing import Any

import av
import pytest
from PIL import Image

from client.cli import main
from client.experiment.command import cell_selection
from client.experiment.routed import ROUTED_SCENARIOS, RoutedCell
from client.experiment.runner import (
    SCENARIOS,
    Cell,
    Report,
    check_metadata,
    run_experiment,
    write_outputs,
)
from client.media import read_pattern_number

SECONDS = 3.0
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def report() -> Report:
    return asyncio.run(run_experiment(SECONDS))


def routed(report: Report, attack: str, layers: str = "verified") -> RoutedCell:
    [found] = [
        c
        for c in report.routed
        if c.scenario.attack_name == f"routed-{attack}" and c.scenario.layers.value == layers
    ]
    return found


def cell(report: Report, layers: str, attack: str) -> Cell:
    [found] = [
        c
        for c in report.cells
        if c.scenario.layers.value == layers and c.scenario.attack_name == attack
    ]
    return found


@slow
def test_the_matrix_has_every_cell_and_the_control_first(report):
    assert [(c.scenario.layers.value, c.scenario.attack_name) for c in report.cells] == [
        ("plain", "dtls-mitm"),
        ("sframe", "dtls-mitm"),
        ("sealed", "dtls-mitm"),
        ("sframe", "keyswap"),
        ("sealed", "keyswap"),
        ("verified", "keyswap"),
        ("verified", "record+tamper"),
        ("sframe", "dtls-mitm+tamper"),
    ]
    assert len(SCENARIOS) == len(report.cells)
    assert [(c.scenario.layers.value, c.scenario.attack_name) for c in report.routed] == [
        ("plain", "routed-record"),
        ("verified", "routed-record"),
        ("verified", "routed-inject"),
        ("verified", "routed-splice"),
        ("verified", "routed-replay+reorder"),
        ("verified", "routed-leave-collusion"),
        ("verified", "routed-ghost"),
        ("sealed", "routed-ghost"),
        ("verified", "routed-roster-split"),
    ]
    assert len(ROUTED_SCENARIOS) == len(report.routed)
    # The default run, every cell, stays within what `make demo` promises on this machine.
    assert report.seconds < 90


@slow
def test_control_plain_under_dtls_mitm_the_hub_recovers_audio_and_video(report):
    control = cell(report, "plain", "dtls-mitm")
    assert control.peer_audio_correlation >= 0.9
    assert control.hub_audio_correlation >= 0.9
    assert control.hub_audio_seconds >= 1
    assert control.hub_decoded_video_frames > 0
    video = control.recovered_video
    assert video is not None and video.last_frame is not None
    assert read_pattern_number(video.last_frame) is not None
    assert control.detected == []
    assert report.valid


@slow
def test_sframe_under_dtls_mitm_the_hub_holds_only_ciphertext(report):
    result = cell(report, "sframe", "dtls-mitm")
    assert result.peer_audio_correlation >= 0.9
    assert result.hub_audio_correlation < 0.1
    assert result.hub_decoded_video_frames == 0
    # What it does read: one KID per direction and counters, from every frame's header.
    directions = {(s["direction"], s["kind"]): s for s in result.sframe_headers}
    assert len(directions) == 4
    kids = {direction: summary["kids"] for (direction, _), summary in directions.items()}
    assert all(len(k) == 1 for k in kids.values())
    assert kids["offerer-to-answerer"] != kids["answerer-to-offerer"]
    assert all(s["last_ctr"] > s["first_ctr"] and s["frames"] > 10 for s in directions.values())


@slow
def test_sealed_under_dtls_mitm_the_rewrite_is_detected_and_the_call_refused(report):
    result = cell(report, "sealed", "dtls-mitm")
    assert "sdp-tampered" in result.detected
    assert not any(peer.completed for peer in result.peers.values())
    assert result.mitm is None and result.hub_audio_correlation == 0
    assert "sealed-sdp-altered" in result.hub_events


@slow
def test_sframe_under_keyswap_the_hub_holds_the_keys_and_recovers_the_audio(report):
    result = cell(report, "sframe", "keyswap")
    assert result.peer_audio_correlation >= 0.9
    assert result.hub_audio_correlation >= 0.9
    assert result.hub_decoded_video_frames > 0
    assert result.detected == []


@slow
def test_sealed_under_keyswap_the_hub_decrypts_but_the_peers_see_different_sas(report):
    result = cell(report, "sealed", "keyswap")
    assert result.peer_audio_correlation >= 0.9
    assert result.hub_audio_correlation >= 0.9
    alice_sas, bob_sas = (peer.sas for peer in result.peers.values())
    assert alice_sas is not None and bob_sas is not None and alice_sas != bob_sas
    assert "sas-mismatch" in result.detected
    # The peers rekey every second; the hub follows each rekey on both legs, without a failure.
    assert all(peer.completed for peer in result.peers.values())
    assert [event for event in result.hub_events if event.startswith("attack-")] == []


@slow
def test_verified_under_keyswap_is_refused_before_any_media_key(report):
    result = cell(report, "verified", "keyswap")
    assert [peer.detections.get("identity-refused") for peer in result.peers.values()] == [1, 1]
    assert not any(peer.completed for peer in result.peers.values())
    # No SDP ever reached the hub: it never got into the media path.
    assert result.mitm is None
    assert result.hub_audio_correlation == 0 and result.hub_decoded_video_frames == 0


@slow
def test_verified_under_record_and_tamper_the_call_works_and_tampering_is_counted(report):
    result = cell(report, "verified", "record+tamper")
    assert result.peer_audio_correlation >= 0.9
    assert all(peer.completed for peer in result.peers.values())
    # Each peer got a replayed and an altered copy of the sealed answer or offer, at least.
    for peer in result.peers.values():
        assert peer.detections.get("replay-rejected", 0) >= 1
        assert peer.detections.get("alteration-rejected", 0) >= 1
    assert result.rejected["replay-rejected"] >= 2
    # The log holds public metadata and sealed payloads only.
    assert result.metadata is not None
    assert result.metadata["leaks"] == []
    assert result.metadata["payload_types"]["sealed"] >= 6
    assert not any(label.startswith("UNSEALED") for label in result.metadata["payload_types"])


@slow
def test_sframe_under_dtls_mitm_and_media_tamper_every_replayed_or_altered_frame_is_rejected(
    report,
):
    result = cell(report, "sframe", "dtls-mitm+tamper")
    assert result.peer_audio_correlation >= 0.9
    assert all(peer.completed for peer in result.peers.values())
    assert result.hub_audio_correlation < 0.1 and result.hub_decoded_video_frames == 0
    # Per peer and kind, the peer rejected exactly what the hub replayed or altered among the
    # frames it received (the hub counts by position in each stream; the last frames it sent
    # were still in flight when the peers hung up).
    for name, kinds in result.media_tampered.items():
        for kind, did in kinds.items():
            rejected = result.peers[name].media[kind]
            assert (rejected["replayed"], rejected["altered"]) == (did["replayed"], did["altered"])
    for what in ("replayed", "altered", "dropped"):
        assert result.media_tampered_total(what) >= 2
    assert result.rejected == {
        "media-replay-rejected": result.media_tampered_total("replayed"),
        "media-alteration-rejected": result.media_tampered_total("altered"),
    }


@slow
def test_routed_control_the_hubs_recording_plays_back_every_members_tone_and_picture(report):
    control = report.routed[0]
    assert control.scenario.is_control and control.scenario.attack_name == "routed-record"
    assert control.peer_audio_correlation >= 0.9
    assert sorted(control.hub) == ["alice", "bob", "carol"]
    for stream in control.hub.values():
        assert stream.correlation >= 0.9
        assert stream.video.frames_decoded > 0 and stream.pattern_number is not None
        # A player (PyAV's default demuxer and decoders) plays the files too.
        assert stream.player["audio"]["audio_seconds"] >= 1
        assert stream.player["video"]["decoded"] > 0


@slow
def test_routed_as_shipped_the_hub_records_everything_and_recovers_nothing(report):
    result = report.routed[1]
    assert (result.scenario.layers.value, result.scenario.attack_name) == (
        "verified",
        "routed-record",
    )
    assert result.all_completed and result.peer_audio_correlation >= 0.9
    assert sorted(result.hub) == ["alice", "bob", "carol"]
    for stream in result.hub.values():
        assert stream.frames["audio"] > 50 and stream.frames["video"] > 20
        assert stream.correlation < 0.1 and stream.video.frames_decoded == 0
        assert stream.pattern_number is None
        # A player decodes Opus noise from ciphertext (Opus decodes almost anything), and no
        # picture at all.
        assert stream.player["video"]["decoded"] == 0
    codes = {member.security_code for member in result.members.values()}
    assert len(codes) == 1 and None not in codes
    assert all(set(member.roster.values()) == {"PINNED"} for member in result.members.values())


@slow
def test_routed_injection_every_frame_the_hub_made_is_rejected_never_decoded(report):
    result = routed(report, "inject")
    assert result.peer_audio_correlation >= 0.9
    assert result.hub_audio_correlation < 0.1 and result.hub_decoded_video_frames == 0
    made = result.attack["counts"]
    assert all(made[what] > 0 for what in ("silence", "keyframe", "bit-flip"))
    for name in ("bob", "carol"):
        for kind in ("audio", "video"):
            rejected = result.members[name].rejected("alice", kind)
            # At most what the hub made toward it (a packet may be lost on the way), and
            # nothing else of alice's: every one is a frame the hub made.
            assert 0 < rejected <= result.attack["toward"][name][kind]
            assert rejected >= result.attack["toward"][name][kind] - 2


@slow
def test_routed_splice_frames_moved_to_another_members_slot_fail_and_are_counted(report):
    result = routed(report, "splice")
    assert (result.attack["source"], result.attack["target"]) == ("bob", "alice")
    assert result.attack["victim"] == "carol"
    spliced = result.attack["toward"]["carol"]
    assert spliced["audio"] > 20 and spliced["video"] > 10
    for kind in ("audio", "video"):
        assert result.members["carol"].rejected("alice", kind) == spliced[kind]
    # ... and carol told whose they were: bob's key authenticates them.
    attributed = result.members["carol"].spliced["alice"]
    assert set(attributed) == {"bob"}
    assert attributed["bob"] == spliced["audio"] + spliced["video"]
    # Carol never heard bob's tone on alice's track.
    assert result.attack["victim_heard_source_as_target"] < 0.1
    # Bob heard alice all along (the hub spliced only toward carol).
    assert result.members["bob"].heard["alice"] >= 0.9


@slow
def test_routed_replay_and_reorder_replays_rejected_reorders_tolerated_counts_exact(report):
    result = routed(report, "replay+reorder")
    assert result.peer_audio_correlation >= 0.9
    counts = result.attack["counts"]
    assert counts["replayed"] > 10 and counts["reordered"] > 10
    for name, kinds in result.attack["replayed_toward"].items():
        for kind, replayed in kinds.items():
            received = result.members[name].received["alice"][kind]
            assert received["replayed"] == replayed
            # Nothing else of alice's failed: every reordered frame decrypted.
            assert result.members[name].rejected("alice", kind) == replayed


@slow
def test_routed_leave_collusion_the_leavers_keys_open_nothing_sent_after_the_leave(report):
    result = routed(report, "leave-collusion")
    leave = result.after_leave
    assert leave is not None and leave["members"] == ["alice", "carol"]
    assert leave["frames"] > 50
    assert leave["decrypted"] == 0 and leave["correlation"] < 0.1
    assert result.hub_audio_correlation < 0.1


@slow
def test_routed_ghost_with_pinned_identities_is_refused_before_any_key(report):
    result = routed(report, "ghost")
    ghost = result.ghost
    assert ghost is not None and ghost["shown_to"] == ["alice", "bob"]
    assert result.attack["hidden"]["pairs"] == [["carol", "ghost"]]
    # Each member it was shown to refused it (not pinned, --verify pinned), and no one let it in.
    for name in ("alice", "bob"):
        assert result.members[name].detections["identity-refused"] == 1
    assert all("ghost" not in member.roster for member in result.members.values())
    assert ghost["on_rosters"] == {}
    # It decrypted nothing, and its keys (none) open nothing the hub recorded before it joined.
    assert ghost["decrypted"] == {"alice": 0, "bob": 0, "carol": 0}
    assert ghost["before_join"]["frames"] > 50 and ghost["before_join"]["decrypted"] == 0
    # The call went on for the members: they heard each other and agree on one code.
    assert result.all_completed and result.peer_audio_correlation >= 0.9
    assert result.distinct_codes == 1
    assert result.hub_audio_correlation < 0.1 and result.hub_decoded_video_frames == 0


@slow
def test_routed_ghost_with_unverified_identities_shows_new_and_splits_the_codes(report):
    result = routed(report, "ghost", "sealed")
    ghost = result.ghost
    assert ghost is not None and ghost["shown_to"] == ["alice", "bob"]
    # Those it was shown to let it in, as NEW; carol never saw it.
    assert ghost["on_rosters"] == {"alice": "NEW", "bob": "NEW"}
    assert "ghost" not in result.members["carol"].roster
    codes = {name: member.security_code for name, member in result.members.items()}
    assert codes["alice"] == codes["bob"] != codes["carol"]
    assert result.distinct_codes == 2 and "security-code-mismatch" in result.detected
    # It decrypts what alice and bob sent after it joined (they accepted it), nothing of
    # carol's, and nothing the hub recorded before it joined.
    assert ghost["decrypted"]["alice"] > 50 and ghost["decrypted"]["bob"] > 50
    assert ghost["decrypted"]["carol"] == 0
    assert ghost["before_join"]["frames"] > 50 and ghost["before_join"]["decrypted"] == 0
    assert result.all_completed and result.peer_audio_correlation >= 0.9


@slow
def test_routed_roster_split_gives_each_view_its_own_security_code(report):
    result = routed(report, "roster-split")
    assert result.attack["hidden"]["pairs"] == [["bob", "carol"]]
    assert result.attack["hidden"]["dropped"]["peer-joined"] >= 1
    assert set(result.members["alice"].roster) == {"bob", "carol"}
    assert set(result.members["bob"].roster) == {"alice"}
    assert set(result.members["carol"].roster) == {"alice"}
    codes = [member.security_code for member in result.members.values()]
    assert None not in codes and len(set(codes)) == 3 == result.distinct_codes
    assert "security-code-mismatch" in result.detected
    # Each heard everyone it was shown; the hub still recovers nothing.
    assert result.peer_audio_correlation >= 0.9
    assert result.hub_audio_correlation < 0.1 and result.hub_decoded_video_frames == 0


@slow
def test_every_cell_as_expected_and_the_json_report(report):
    document = report.as_dict()
    assert document["valid"] is True and document["all_as_expected"] is True
    required = {
        "layers",
        "attack",
        "peer_audio_correlation",
        "hub_audio_correlation",
        "hub_decoded_video_frames",
        "detected",
        "verdict",
    }
    assert all(required <= set(entry) for entry in document["cells"])
    assert [entry["number"] for entry in document["cells"] if entry["routed"]] == [
        f"R{n}" for n in range(1, len(ROUTED_SCENARIOS) + 1)
    ]
    assert json.loads(json.dumps(document)) == document


@slow
def test_a_failed_control_makes_the_experiment_invalid(report):
    control, *others = report.cells
    failed = dataclasses.replace(control, hub_audio_correlation=0.0)
    assert not Report([failed, *others], 0.0).valid
    assert not Report(others, 0.0).valid  # no control, no proof
    # The routed cells have their own control: it must recover the audio, or nothing holds.
    routed_control, *routed_others = report.routed
    broken = dataclasses.replace(routed_control, hub={})
    assert not Report(report.cells, 0.0, [broken, *routed_others]).valid
    assert not Report(report.cells, 0.0, routed_others).valid
    assert Report([], 0.0, report.routed).valid
    assert "INVALID" in Report([failed, *others], 0.0).table()


@slow
def test_outputs_are_written_and_readable(report, tmp_path):
    paths = write_outputs(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["valid"] is True
    with wave.open(str(tmp_path / "cell1-plain-dtls-mitm-hub-offerer-to-answerer.wav")) as wav:
        assert wav.getframerate() == 48000 and wav.getnframes() >= 48000
    with av.open(str(tmp_path / "cell1-plain-dtls-mitm-hub-offerer-to-answerer.png")) as png:
        assert read_pattern_number(next(png.decode(video=0))) is not None
    # No picture where the hub decoded none.
    assert not list(tmp_path.glob("cell2-*.png"))
    with Image.open(tmp_path / "figure.png") as figure:
        assert figure.format == "PNG"
        assert figure.width > 1000 and figure.height > 7 * 80
    assert "no frame" in (tmp_path / "figure.svg").read_text()
    assert {tmp_path / "figure.png", tmp_path / "figure.svg"} <= set(paths)
    # The routed control's recovered tone and picture of every member, and none in R2.
    for name in ("alice", "bob", "carol"):
        with wave.open(str(tmp_path / f"R1-plain-routed-record-hub-{name}.wav")) as wav:
            assert wav.getnframes() >= 48000
        with av.open(str(tmp_path / f"R1-plain-routed-record-hub-{name}.png")) as png:
            assert read_pattern_number(next(png.decode(video=0))) is not None
    assert not list(tmp_path.glob("R2-*.png"))
    assert tmp_path / "index.html" in paths


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, list[str]] = {"audio": [], "img": []}
        self.other: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.files.get(tag, self.other).append(value)


@slow
def test_the_page_is_self_contained_and_every_sound_plays(report, tmp_path):
    write_outputs(report, tmp_path)
    page = (tmp_path / "index.html").read_text()
    assert "http://" not in page and "https://" not in page
    references = _References()
    references.feed(page)
    assert references.other == []  # no stylesheet, script or link: the style is inline
    # The figure and the hub's pictures; each cell's sounds: each peer heard, the hub recovered.
    assert "figure.png" in references.files["img"]
    for name in references.files["img"]:
        assert "/" not in name and (tmp_path / name).is_file()
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"
    sounds = references.files["audio"]
    assert len(sounds) == len(set(sounds)) > len(report.cells) + len(report.routed)
    for name in sounds:
        assert "/" not in name and (tmp_path / name).is_file()
        with av.open(str(tmp_path / name)) as container:
            assert sum(frame.samples for frame in container.decode(audio=0)) > 0
    # Every cell has its section, the control's tone against a protected cell's noise.
    for number in [*map(str, range(1, len(report.cells) + 1)), "R1", "R2"]:
        assert f'id="{number}"' in page
    assert "R1-plain-routed-record-hub-alice.wav" in sounds
    assert "R2-verified-routed-record-hub-alice.wav" in sounds
    for listener, speaker in itertools.permutations(("alice", "bob", "carol"), 2):
        assert f"R2-verified-routed-record-{listener}-heard-{speaker}.wav" in sounds


def test_metadata_check_finds_unsealed_sdp_candidates_and_addresses():
    clean: list[dict[str, Any]] = [
        {"type": "welcome", "payload": None},
        {"type": "relay", "payload": {"type": "hello", "name": "alice"}},
        {
            "type": "relay",
            "payload": {"v": 2, "type": "sealed", "epoch": 0, "seq": 0, "ciphertext": "AAAA"},
        },
    ]
    assert check_metadata(clean)["leaks"] == []
    leaky: list[dict[str, Any]] = [
        *clean,
        {"type": "relay", "payload": {"type": "offer", "sdp": "v=0\r\nm=audio 9\r\n"}},
        {"type": "relay", "payload": {"type": "x", "c": "candidate:1 1 udp 1 192.168.1.20 5000"}},
    ]
    leaks = check_metadata(leaky)["leaks"]
    assert {"sdp", "candidate", "ip-address"} <= set(leaks)
    assert "an unsealed 'offer' payload" in leaks


def test_cells_choose_cells_and_always_add_each_familys_control():
    assert cell_selection("all") == (list(range(8)), list(range(9)))
    assert cell_selection("R3,5") == ([0, 4], [0, 2])
    assert cell_selection("routed") == ([], list(range(9)))
    assert cell_selection("two-party") == (list(range(8)), [])
    for bad in ("9", "R10", "x", "R"):
        with pytest.raises(Exception, match="is not a cell"):
            cell_selection(bad)


@pytest.mark.parametrize("seconds", ["0", "61", "nan", "three"])
def test_demo_refuses_a_bad_duration_as_a_usage_error(capsys, seconds):
    # Exit 2 is a usage error, as for every blindhub command: never a cell's outcome.
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--seconds", seconds])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: blindhub demo")
    assert "argument --seconds: must be a number of seconds from 1 to 60" in error
