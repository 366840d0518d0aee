"""Every vectors file is the one its provenance note names, checked by its SHA-256."""

import hashlib
import re
from pathlib import Path

VECTORS = Path(__file__).parent / "vectors"
NOTE = "README.md"
# How a note records a file beside it (or below it, by relative path).
RECORD = re.compile(r"SHA-256 of `([^`]+)`: `([0-9a-f]{64})`")


def recorded(directory: Path) -> dict[Path, str]:
    """Each file the notes under ``directory`` record, with the SHA-256 they give for it."""
    hashes: dict[Path, str] = {}
    for note in sorted(directory.rglob(NOTE)):
        for name, digest in RECORD.findall(note.read_text(encoding="utf-8")):
            path = note.parent / name
            assert path not in hashes, f"{path} is recorded twice"
            hashes[path] = digest
    return hashes


def vector_files(directory: Path) -> list[Path]:
    """Every file under ``directory`` but the notes, and the Python that generates vectors
    (code, whose output is checked against the vectors it writes)."""
    return sorted(
        path
        for path in directory.rglob("*")
        if path.is_file()
        and path.name != NOTE
        and path.suffix not in {".py", ".pyc"}
        and "__pycache__" not in path.parts
    )


def provenance_problems(directory: Path) -> list[str]:
    """What does not match: a file with no recorded hash or another one, a record of no file."""
    hashes = recorded(directory)
    problems = []
    for path in vector_files(directory):
        name = path.relative_to(directory)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if path not in hashes:
            problems.append(f"{name}: no SHA-256 recorded in a {NOTE} (it is {digest})")
        elif hashes[path] != digest:
            problems.append(f"{name}: SHA-256 is {digest}, its note says {hashes[path]}")
    problems += [
        f"{path.relative_to(directory)}: recorded, but there is no such file"
        for path in hashes
        if not path.is_file()
    ]
    return problems


def test_every_vectors_file_has_the_sha256_its_provenance_note_records():
    assert vector_files(VECTORS), "no vectors found"
    assert provenance_problems(VECTORS) == []


def test_an_unrecorded_changed_or_missing_file_is_a_problem(tmp_path):
    (tmp_path / "sub").mkdir()
    good, changed = tmp_path / "sub" / "good.json", tmp_path / "changed.bin"
    good.write_bytes(b"{}")
    changed.write_bytes(b"new")
    (tmp_path / "unrecorded.json").write_bytes(b"[]")
    (tmp_path / "generate.py").write_text("")
    digest = {data: hashlib.sha256(data).hexdigest() for data in (b"{}", b"old", b"gone")}
    (tmp_path / "sub" / NOTE).write_text(f"SHA-256 of `good.json`: `{digest[b'{}']}`\n")
    (tmp_path / NOTE).write_text(
        f"- SHA-256 of `changed.bin`: `{digest[b'old']}`;\n"
        f"- SHA-256 of `gone.json`: `{digest[b'gone']}`.\n"
    )
    assert provenance_problems(tmp_path) == [
        f"changed.bin: SHA-256 is {hashlib.sha256(b'new').hexdigest()}, its note says "
        f"{digest[b'old']}",
        f"unrecorded.json: no SHA-256 recorded in a {NOTE} (it is "
        f"{hashlib.sha256(b'[]').hexdigest()})",
        "gone.json: recorded, but there is no such file",
    ]
