"""Pure logic, no engine: name allocation, the clone's create body, CRIU version gating."""
from __future__ import annotations

import io
import json
import os
import stat

import pytest

from dolly import _criu as criu
from dolly._names import allocate_names
from dolly._start import Identity, clone_config
from dolly.errors import HostNotReady, InvalidArgument

SOURCE_ID = "0123456789ab" + "c" * 52


def recorded(**host):
    return {
        "Id": SOURCE_ID,
        "Image": "sha256:feed",
        "Config": {"Hostname": "0123456789ab", "MacAddress": "02:42:ac:11:00:02", "Image": "web",
                   "Cmd": ["serve"], "Env": ["A=1"], "Labels": {"team": "x"}},
        "HostConfig": {"NetworkMode": "appnet", "Runtime": "runc",
                       "PortBindings": {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]},
                       "Binds": ["/srv:/srv:ro"], **host},
        "NetworkSettings": {"Networks": {
            "appnet": {"Aliases": ["0123456789ab", "api"], "IPAMConfig": {"IPv4Address": "10.0.0.5"},
                       "IPAddress": "10.0.0.5", "MacAddress": "02:42:0a:00:00:05"},
            "backend": {"Aliases": None, "IPAddress": "10.1.0.5"},
        }},
    }


def test_allocate_names_takes_the_lowest_free_numbers():
    assert allocate_names("web", 3, {"web-1", "web-3", "other"}) == ["web-2", "web-4", "web-5"]
    assert allocate_names("web", 1, set()) == ["web-1"]


def test_clone_config_drops_the_source_identity_and_keeps_the_rest():
    config, extra = clone_config(recorded(), image="web", labels={"dolly.source": SOURCE_ID})
    assert "Hostname" not in config and "MacAddress" not in config
    assert config["Cmd"] == ["serve"] and config["Env"] == ["A=1"] and config["Image"] == "web"
    assert config["Labels"] == {"team": "x", "dolly.source": SOURCE_ID}
    host = config["HostConfig"]
    assert host["Runtime"] == "dolly"
    assert host["Binds"] == ["/srv:/srv:ro"]
    assert host["PortBindings"] == {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    primary = config["NetworkingConfig"]["EndpointsConfig"]
    assert list(primary) == ["appnet"]
    assert primary["appnet"]["Aliases"] == ["api"]
    assert "IPAMConfig" not in primary["appnet"] and "IPAddress" not in primary["appnet"]
    assert list(extra) == ["backend"]


def test_clone_config_does_not_touch_the_recorded_config():
    rec = recorded()
    clone_config(rec, image="web", labels={"k": "v"})
    assert rec["Config"]["Hostname"] == "0123456789ab"
    assert rec["HostConfig"]["PortBindings"]["8000/tcp"][0]["HostPort"] == "8080"


def test_clone_config_with_a_shared_network_namespace_has_no_endpoints():
    config, extra = clone_config(recorded(NetworkMode="container:abc"), image="web", labels={})
    assert config["NetworkingConfig"] == {"EndpointsConfig": {}} and extra == {}


def test_clone_config_with_a_network_joins_it_alone():
    config, extra = clone_config(recorded(), image="web", labels={}, network="dense-2")
    assert config["HostConfig"]["NetworkMode"] == "dense-2"
    assert config["NetworkingConfig"] == {"EndpointsConfig": {"dense-2": {}}} and extra == {}


def test_a_network_for_a_source_without_its_own_network_is_refused():
    for mode in ("host", "none", "container:abc"):
        with pytest.raises(InvalidArgument):
            clone_config(recorded(NetworkMode=mode), image="web", labels={}, network="dense-2")


@pytest.mark.parametrize("name", ["a" * 65, "-lead", "under_score", "", "a..b", 7])
def test_bad_hostnames_are_refused(name):
    with pytest.raises(InvalidArgument):
        criu.check_hostname(name)


def _fake_criu(tmp_path, text):
    # A stand-in that only prints a version: this tests the version gate, not CRIU.
    exe = tmp_path / "criu"
    exe.write_text(f"#!/bin/sh\necho '{text}'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(tmp_path)


def test_criu_older_than_4_2_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_criu(tmp_path, "Version: 4.1.1"))
    assert criu.version() == (4, 1, 1)
    with pytest.raises(HostNotReady, match="too old"):
        criu.require_version()


def test_missing_criu_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert criu.version() is None
    with pytest.raises(HostNotReady, match="not installed"):
        criu.require_version()


@pytest.mark.engine  # the host's own CRIU, as root: a check of the host, not of logic
def test_installed_criu_is_new_enough():
    assert os.geteuid() == 0
    assert criu.require_version()[:2] >= (4, 2)


def test_the_criu_excerpt_is_criu_s_own_error_lines_and_what_came_before():
    from dolly._criu_log import criu_excerpt

    log = [
        "(00.001000) Version: 4.2.1 (gitid dolly-0)",
        "(00.010000) Found library /usr/lib/x86_64-linux-gnu/libgpg-error.so.0",  # not an error
        "(00.020000) cg: Set 1 is criu one",
        "(00.030000) Dumping core (pid: 10959)",
        "(00.031000) Obtaining task auvx ...",
        "(00.040129) Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted",
        "(00.040132) Error (criu/cr-dump.c:1584): Dump core (pid: 10959) failed with -1",
        "(00.050000) Unlock network",
        "(00.084977) Error (criu/cr-dump.c:1975): Dumping FAILED.",
    ]
    assert criu_excerpt(log) == log[2:]
    assert criu_excerpt(log, limit=2) == log[-2:]
    # No error line of CRIU's own: the end of the log, however often it says "error".
    quiet = ["(00.1) error-free line", "(00.2) libgpg-error.so", "(00.3) done"]
    assert criu_excerpt(quiet, limit=2) == quiet[-2:]
    # The line that says what to do comes first (a server with a client connected, issue 24).
    tcp = "(00.060000) Error (criu/sk-inet.c:200): inet: Connected TCP socket, consider using --tcp-established option."
    hinted = [*log[:6], tcp, *log[6:]]
    assert criu_excerpt(hinted) == [tcp, *[line for line in hinted[2:] if line != tcp]]


def overlay_tar(path, members):
    """An overlay-form layer archive as dolly-runc writes one: (name, kind, pax headers, data)."""
    from dolly._archive import tarfile

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, pax, data in members:
            info = tarfile.TarInfo(name)
            info.pax_headers = dict(pax)
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "whiteout":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 0, 0
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)


def test_an_overlay_layer_becomes_an_image_layer_with_oci_whiteouts(tmp_path):
    from dolly import _rootfs as rootfs
    from dolly._archive import tarfile

    src = tmp_path / "diff.tar"
    overlay_tar(src, [
        (".", "dir", {}, b""),
        ("./etc", "dir", {}, b""),
        ("./etc/group", "whiteout", {}, b""),
        ("./var", "dir", {"SCHILY.xattr.trusted.overlay.opaque": "y"}, b""),
        ("./var/new", "file", {"SCHILY.xattr.user.note": "kept"}, b"v\n"),
    ])
    out = io.BytesIO()
    rootfs.to_image_layer(src, out, max_bytes=1 << 20)
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        members = {m.name: m for m in tar}
        assert list(members) == ["etc", "etc/.wh.group", "var", "var/.wh..wh..opq", "var/new"]
        assert members["etc/.wh.group"].isfile() and members["etc/.wh.group"].size == 0
        assert not any(k.startswith("SCHILY.xattr.trusted.overlay.") for m in members.values() for k in m.pax_headers)
        assert members["var/new"].pax_headers["SCHILY.xattr.user.note"] == "kept"
        assert tar.extractfile(members["var/new"]).read() == b"v\n"


@pytest.mark.parametrize("member", [
    ("./.wh.looks-like-a-whiteout", "file", {}, b"x"),
    ("./moved", "dir", {"SCHILY.xattr.trusted.overlay.redirect": "/old"}, b""),
    ("./big", "file", {"SCHILY.xattr.trusted.overlay.metacopy": ""}, b""),
])
def test_what_an_image_layer_cannot_say_is_refused_so_the_layer_is_unpacked(tmp_path, member):
    from dolly import _rootfs as rootfs

    src = tmp_path / "diff.tar"
    overlay_tar(src, [(".", "dir", {}, b""), member])
    with pytest.raises(InvalidArgument):
        rootfs.to_image_layer(src, io.BytesIO(), max_bytes=1 << 20)


def test_a_reset_keeps_the_identity_the_container_had():
    attrs = {
        "Config": {"Hostname": "db-host"},
        "HostConfig": {"NetworkMode": "shop",
                       "PortBindings": {"5432/tcp": [{"HostIp": "", "HostPort": ""}],
                                        "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]}},
        "NetworkSettings": {"MacAddress": "02:42:0a:00:00:05",
                            "Ports": {"5432/tcp": [{"HostIp": "0.0.0.0", "HostPort": "49153"}],
                                      "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]},
                            "Networks": {"shop": {"IPAddress": "10.0.0.5"}, "bridge": {"IPAddress": "172.17.0.9"}}},
    }
    keep = Identity.of(attrs)
    assert keep == Identity("db-host", "02:42:0a:00:00:05",
                            {"5432/tcp": [{"HostIp": "", "HostPort": "49153"}],
                             "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]},
                            {"shop": "10.0.0.5"})  # the default bridge takes no fixed address
    assert Identity.from_json(json.loads(json.dumps(keep.to_json()))) == keep
    rec = recorded(NetworkMode="shop")
    rec["NetworkSettings"]["Networks"] = {"shop": {"Aliases": None}, "bridge": {"Aliases": None}}
    config, extra = clone_config(rec, image="web", labels={}, keep=keep)
    assert config["Hostname"] == "db-host" and config["MacAddress"] == "02:42:0a:00:00:05"
    assert config["HostConfig"]["PortBindings"] == keep.ports
    assert config["NetworkingConfig"]["EndpointsConfig"]["shop"]["IPAMConfig"] == {"IPv4Address": "10.0.0.5"}
    assert "IPAMConfig" not in extra["bridge"]
    plain, _ = clone_config(rec, image="web", labels={})
    assert "Hostname" not in plain and "IPAMConfig" not in plain["NetworkingConfig"]["EndpointsConfig"]["shop"]


def test_a_container_in_another_s_network_namespace_keeps_no_address():
    keep = Identity.of({"Config": {"Hostname": "h"}, "HostConfig": {"NetworkMode": "container:abc"},
                        "NetworkSettings": {"MacAddress": "02:42:00:00:00:01", "Networks": {}}})
    assert (keep.mac_address, keep.addresses, keep.ports) == ("", {}, {})
