"""Reading archives from outside, and sealing bundles: pure logic on files the tests make, no engine."""
from __future__ import annotations

import io
import json
import os
import subprocess

import pytest

from dolly import _archive as archive, _rootfs as rootfs, errors, trust
from dolly._archive import tarfile  # the one Dolly reads with: 3.12's, backported to 3.11


def tar_bytes(*members, pax_first: bytes = b"") -> bytes:
    buf = io.BytesIO()
    if pax_first:
        header = tarfile.TarInfo("PaxHeaders/x")
        header.type, header.size = tarfile.XHDTYPE, len(pax_first)
        buf.write(header.tobuf(format=tarfile.USTAR_FORMAT) + pax_first + b"\0" * (-len(pax_first) % 512))
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def file(name: str, payload: bytes = b"x", **attrs) -> tuple:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    for k, v in attrs.items():
        setattr(info, k, v)
    return info, payload


def read_all(data: bytes, tarinfo=archive.BoundedTarInfo) -> list:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|", tarinfo=tarinfo) as tar:
        return [(m.name, m.pax_headers.get("comment")) for m in tar]


def record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def test_well_formed_pax_headers_are_read_as_tarfile_reads_them():
    long_name = "d/" + "n" * 300
    data = tar_bytes(file(long_name, pax_headers={"comment": "é" * 50}))
    assert read_all(data) == [(long_name, "é" * 50)]
    assert read_all(tar_bytes(file("a"), pax_first=record(b"comment", b"hello"))) == [("a", "hello")]


@pytest.mark.parametrize("payload", [
    b"5 aa\n" * 2000 + b"=",                       # lengths that do not match: quadratic rescans
    b"99 comment=short\n",                         # a record longer than the header
    b"x comment=a\n",                              # no length
    record(b"comment", b"1" * 1000),               # a digit run tarfile's search backtracks over
])
def test_malformed_or_slow_pax_headers_are_refused(payload):
    with pytest.raises(errors.UnsafeArchive):
        read_all(tar_bytes(file("a"), pax_first=payload))


def test_a_header_larger_than_the_bound_is_refused_unread():
    class Counting(io.BytesIO):
        biggest = 0

        def read(self, n=-1):
            Counting.biggest = max(Counting.biggest, n)
            return super().read(n)

    big = record(b"comment", b"a" * (archive.MAX_HEADER + 1))
    with pytest.raises(errors.UnsafeArchive, match="tar header"):
        with tarfile.open(fileobj=Counting(tar_bytes(file("a"), pax_first=big)), mode="r|",
                          tarinfo=archive.BoundedTarInfo) as tar:
            list(tar)
    assert Counting.biggest < archive.MAX_HEADER


def test_sparse_files_only_from_dolly_itself(tmp_path):
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(1 << 30)
        f.seek(5 << 20)
        f.write(b"data")
    out = tmp_path / "s.tar"
    os.system(f"tar -C {tmp_path} --sparse -cf {out} sparse")
    with pytest.raises(errors.UnsafeArchive, match="sparse"):
        read_all(out.read_bytes())
    assert [n for n, _ in read_all(out.read_bytes(), archive.OwnTarInfo)] == ["sparse"]


def test_the_overlay_form_refuses_what_could_leave_the_layer(tmp_path):
    def convert(*members, deleted=()):
        src = tmp_path / "in.tar"
        src.write_bytes(tar_bytes(*members))
        rootfs.to_overlay_form(src, list(deleted), tmp_path / "out.tar", max_bytes=1 << 20)
        with tarfile.open(tmp_path / "out.tar") as tar:
            return {m.name: m for m in tar}

    link = tarfile.TarInfo("l")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    hard = tarfile.TarInfo("h")
    hard.type, hard.linkname = tarfile.LNKTYPE, "l"
    with pytest.raises(errors.UnsafeArchive, match="beneath h"):
        convert((link, None), (hard, None), file("h/x"))
    with pytest.raises(errors.UnsafeArchive, match="beneath l"):
        convert((link, None), deleted=["/l/passwd"])
    with pytest.raises(errors.UnsafeArchive, match="beneath f"):
        convert(file("f"), file("f/g"))
    with pytest.raises(errors.UnsafeArchive, match="more than"):
        convert(file("big", b"x" * (2 << 20)))
    # What is fine: a deleted file becomes a whiteout, a deleted-then-made directory opaque, and
    # a file both deleted and present stays present.
    d = tarfile.TarInfo("d")
    d.type = tarfile.DIRTYPE
    out = convert((d, None), file("d/new"), file("kept"), deleted=["/gone", "/d", "/kept"])
    assert out["gone"].ischr() and (out["gone"].devmajor, out["gone"].devminor) == (0, 0)
    assert out["d"].pax_headers.get("SCHILY.xattr.trusted.overlay.opaque") == "y"
    assert out["kept"].isfile()


def test_sealed_streams_round_trip_and_resist_tampering():
    key = trust.generate_encryption_key()
    for size in (0, 1, trust.CHUNK, trust.CHUNK + 1, 2 * trust.CHUNK + 7):
        data = os.urandom(size)
        sealed = io.BytesIO()
        writer = trust.EncryptingWriter(key, sealed)
        writer.write(data[:3])
        writer.write(data[3:])
        writer.close()
        assert io.BufferedReader(trust.DecryptingReader(key, io.BytesIO(sealed.getvalue()))).read() == data
        cut = sealed.getvalue()[: len(sealed.getvalue()) - 1]
        with pytest.raises(errors.DecryptionFailed):
            io.BufferedReader(trust.DecryptingReader(key, io.BytesIO(cut))).read()
    with pytest.raises(errors.DecryptionFailed):
        io.BufferedReader(trust.DecryptingReader(trust.generate_encryption_key(), io.BytesIO(sealed.getvalue()))).read()


def test_damaged_streams_are_bundle_errors(tmp_path):
    path = tmp_path / "b.dolly"
    good = tar_bytes(file("manifest.json", json.dumps({}).encode()))
    import gzip
    for data in (gzip.compress(good)[:-20], b"\x28\xb5\x2f\xfd" + b"\0" * 50, b"\x1f\x8b" + os.urandom(100)):
        path.write_bytes(data)
        with pytest.raises(errors.BundleError):
            with archive.open_bundle(path, None) as tar:
                list(tar)


def test_a_chain_of_extended_headers_is_refused():
    buf = io.BytesIO()
    for _ in range(archive.MAX_CHAIN + 5):
        payload = record(b"comment", b"x")
        header = tarfile.TarInfo("PaxHeaders/x")
        header.type, header.size = tarfile.XHDTYPE, len(payload)
        buf.write(header.tobuf(format=tarfile.USTAR_FORMAT) + payload + b"\0" * (-len(payload) % 512))
    buf.write(tar_bytes(file("a")))
    with pytest.raises(errors.UnsafeArchive, match="in a row"):
        read_all(buf.getvalue())


@pytest.mark.parametrize("name", ["a/" * 300 + "f", "d/" + "n" * 5000])
def test_paths_too_deep_or_long_are_refused(name):
    with pytest.raises(errors.UnsafeArchive):
        archive.safe_relpath(name)


def test_the_overlay_form_keeps_only_checked_names_and_user_attributes(tmp_path):
    """GNU tar obeys a pax "path" or "GNU.sparse.name" record over the header's name: the
    converted archive carries the names that were checked, and no record but user xattrs."""
    src = tmp_path / "in.tar"
    info, payload = file("good", pax_headers={"GNU.sparse.name": "d/evil", "SCHILY.xattr.user.note": "kept",
                                              "SCHILY.xattr.trusted.overlay.redirect": "/etc",
                                              "SCHILY.xattr.security.selinux": "system_u"})
    src.write_bytes(tar_bytes((info, payload)))
    rootfs.to_overlay_form(src, [], tmp_path / "out.tar", max_bytes=1 << 20)
    with tarfile.open(src) as tar:
        (checked,) = [m.name for m in tar.getmembers()]
    with tarfile.open(tmp_path / "out.tar") as tar:
        (m,) = tar.getmembers()
    assert m.pax_headers == {"SCHILY.xattr.user.note": "kept"}
    gnu = subprocess.run(["tar", "-tf", str(tmp_path / "out.tar")], capture_output=True, text=True, check=True)
    assert gnu.stdout.split() == [m.name] == [checked]


# --- a tmpfs's files, which CRIU unpacks with GNU tar as root (archive.repack_tmpfs) -----------------


def _tmpfs_tar(tmp_path, *members) -> os.PathLike:
    """A plain tar of ``members``: ``(TarInfo, payload or None)``."""
    path = tmp_path / f"tmpfs-{len(list(tmp_path.iterdir()))}.tar"
    with tarfile.open(path, "w") as tar:
        for info, payload in members:
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def _entry(name: str, kind=tarfile.REGTYPE, **attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def test_a_tmpfs_image_keeps_files_folders_links_and_the_container_devices(tmp_path):
    source = _tmpfs_tar(tmp_path, (_entry("./", tarfile.DIRTYPE, mode=0o755), None),
                        (_entry("./null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), None),
                        (_entry("./fd", tarfile.SYMTYPE, linkname="/proc/self/fd"), None),
                        (_entry("./data", mode=0o4755, uid=70, gid=70), b"kept"))
    archive.repack_tmpfs(source, tmp_path / "out.tar.gz", max_bytes=1 << 20)
    with tarfile.open(tmp_path / "out.tar.gz", "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["./data"].mode == 0o755 and members["./data"].uid == 70, "set-id bits go, owners stay"
        assert tar.extractfile("./data").read() == b"kept"
        assert (members["./null"].devmajor, members["./null"].devminor) == (1, 3)
        assert members["./fd"].linkname == "/proc/self/fd"


@pytest.mark.parametrize("members", [
    [(_entry("./sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None)],
    [(_entry("./mem", tarfile.CHRTYPE, devmajor=1, devminor=1), None)],
    [(_entry("./etc", tarfile.SYMTYPE, linkname="/etc"), None), (_entry("./etc/cron.d/x"), b"* * * * * root sh")],
    [(_entry("./hard", tarfile.LNKTYPE, linkname="/etc/shadow"), None)],
    [(_entry("../escape"), b"x")],
    [(_entry("./fifo", tarfile.FIFOTYPE), None)],
], ids=["block-device", "dev-mem", "under-a-symlink", "hard-link", "dot-dot", "fifo"])
def test_a_tmpfs_image_with_anything_else_is_refused_and_nothing_written(tmp_path, members):
    source = _tmpfs_tar(tmp_path, *members)
    with pytest.raises(errors.UnsafeArchive):
        archive.repack_tmpfs(source, tmp_path / "out.tar.gz", max_bytes=1 << 20)
    assert not (tmp_path / "out.tar.gz").exists()
