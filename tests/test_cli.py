"""The `dolly` command, run as a user runs it: the installed console script, in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import docker
import pytest

from dolly._engine import Engine
from helpers import BUSYBOX, COUNTER, ENGINE_B_URL, RUN_ID, assert_counts_on, dolly_cmd, read_int


@pytest.mark.parametrize("sub", ["", "checkpoint", "restore", "clone", "ls", "rm", "prune", "doctor",
                                 "keygen", "export", "import", "migrate"])
def test_help(sub):
    res = dolly_cmd(*([sub] if sub else []), "--help")
    assert res.returncode == 0 and "Usage: dolly" in res.stdout


def test_python_m_dolly_is_the_command():
    """`python -m dolly` runs the same command as the console script (issue 24)."""
    res = subprocess.run([sys.executable, "-m", "dolly", "clone", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert "Usage: python -m dolly clone [OPTIONS] CONTAINER CHECKPOINT" in res.stdout
    assert "COUNT" not in res.stdout  # the help names only arguments the command takes


@pytest.mark.engine  # the whole host: the engine, CRIU, pycriu
def test_doctor_passes_on_this_host():
    res = dolly_cmd("doctor")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "criu check" in res.stdout and "FAIL" not in res.stdout
    rows = json.loads(dolly_cmd("--json", "doctor").stdout)
    assert {r["name"] for r in rows} >= {"engine", "experimental mode", "CRIU version", "pycriu"}
    assert all(r["ok"] for r in rows)


def test_checkpoint_clone_restore_ls_rm(run, client):
    source = run(BUSYBOX, ["sh", "-c", COUNTER], name=f"cli-src-{RUN_ID}")
    time.sleep(1)
    before = read_int(source)
    made = json.loads(dolly_cmd("--json", "checkpoint", source.name, "c1").stdout)
    assert made[0]["name"] == "c1" and made[0]["container_id"] == source.id

    res = dolly_cmd("--json", "clone", source.name, "c1", "-n", "3", "--prefix", f"cli-{RUN_ID}")
    assert res.returncode == 0, res.stderr
    clones = json.loads(res.stdout)
    assert [c["name"] for c in clones] == [f"cli-{RUN_ID}-{k}" for k in (1, 2, 3)]
    assert len({c["hostname"] for c in clones}) == len({c["ip"] for c in clones}) == 3
    for c in clones:
        assert_counts_on(client.containers.get(c["id"]), before)

    restored = json.loads(dolly_cmd("--json", "restore", source.name, "c1", "--name", f"cli-one-{RUN_ID}").stdout)
    assert restored[0]["name"] == f"cli-one-{RUN_ID}" and restored[0]["status"] == "running"

    table = dolly_cmd("ls", source.name).stdout
    assert "c1" in table and source.name in table
    assert [r["name"] for r in json.loads(dolly_cmd("--json", "ls", source.id).stdout)] == ["c1"]
    assert dolly_cmd("rm", source.name, "c1").returncode == 0
    assert json.loads(dolly_cmd("--json", "ls", source.name).stdout) == []


def test_errors_are_one_line_with_exit_code_1(run):
    source = run(BUSYBOX, ["sh", "-c", COUNTER])
    res = dolly_cmd("clone", source.id, "no-such-checkpoint")
    assert res.returncode == 1
    assert res.stderr.strip().startswith("error: CheckpointNotFound")
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    res = dolly_cmd("--debug", "clone", source.id, "no-such-checkpoint")
    assert res.returncode == 1 and "Traceback" in res.stderr


def test_usage_errors_exit_2():
    assert dolly_cmd("clone", "x", "y", "-n", "0").returncode == 2
    assert dolly_cmd("no-such-command").returncode == 2


def test_keygen_export_import_migrate(run, client, engine_b, tmp_path):
    b_url = ENGINE_B_URL
    source = run(BUSYBOX, ["sh", "-c", COUNTER], name=f"cli-mig-{RUN_ID}")
    time.sleep(0.5)
    assert dolly_cmd("keygen", str(tmp_path / "k.pem"), str(tmp_path / "k.pub")).returncode == 0
    assert dolly_cmd("checkpoint", source.name, "e1").returncode == 0
    res = dolly_cmd("--json", "export", source.name, "e1", str(tmp_path / "e1.dolly"),
                    "--sign", str(tmp_path / "k.pem"))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["size_bytes"] > 0

    unsigned = dolly_cmd("-H", b_url, "import", str(tmp_path / "e1.dolly"))
    assert unsigned.returncode == 1 and unsigned.stderr.startswith("error: UntrustedSigner")
    res = dolly_cmd("-H", b_url, "--json", "import", str(tmp_path / "e1.dolly"), "--trust", str(tmp_path / "k.pub"),
                    "--image-from", "unix:///var/run/docker.sock")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)[0]["name"] == "e1"
    assert dolly_cmd("-H", b_url, "rm", source.id, "e1").returncode == 0
    assert dolly_cmd("rm", source.name, "e1").returncode == 0

    before = read_int(source)
    res = dolly_cmd("--json", "migrate", source.name, "--to", b_url)
    assert res.returncode == 0, res.stderr
    moved = json.loads(res.stdout)
    assert moved["name"] == source.name and "downtime_s" in moved
    assert_counts_on(engine_b.containers.get(moved["id"]), before)
    assert source.id not in {c.id for c in client.containers.list(all=True)}
    engine_b.containers.get(moved["id"]).remove(force=True)


def test_output_options_after_the_command_and_versions(busybox_checkpoint):
    after = dolly_cmd("ls", "--json")
    assert after.returncode == 0, after.stderr
    rows = json.loads(after.stdout)
    assert any(r["name"] == busybox_checkpoint.name and r["container_id"] == busybox_checkpoint.container_id
               for r in rows)
    assert json.loads(dolly_cmd("--json", "ls").stdout) == rows
    version = dolly_cmd("--version")
    assert version.returncode == 0
    lines = dict(line.split(" ", 1) if not line.startswith("docker engine") else ("engine", line[14:])
                 for line in version.stdout.splitlines())
    assert lines["dolly"] == "0.1.0" and lines["criu"].startswith("4.2") and lines["engine"][0].isdigit()


def test_doctor_reports_an_engine_that_does_not_answer(tmp_path):
    url = f"unix://{tmp_path}/nobody.sock"
    res = dolly_cmd("-H", url, "doctor", "--json")
    assert res.returncode == 1, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert not rows["engine"]["ok"] and url in rows["engine"]["detail"] and rows["engine"]["fix"]
    assert "CRIU version" in rows  # the rest of the report is still there (CRIU is `make host`'s)
    assert "Traceback" not in res.stderr and "DockerException" not in res.stderr


def doctor_rows(res: subprocess.CompletedProcess) -> dict:
    assert "Traceback" not in res.stderr, res.stderr
    return {r["name"]: r for r in json.loads(res.stdout)}


@pytest.mark.engine
def test_doctor_reports_a_missing_or_old_criu_and_a_missing_pycriu(tmp_path):
    # No criu on PATH (make host installs it in /usr/sbin).
    res = dolly_cmd("doctor", "--json", env={**os.environ, "PATH": "/usr/bin:/bin"})
    rows = doctor_rows(res)
    assert res.returncode == 1 and rows["engine"]["ok"]
    assert not rows["CRIU version"]["ok"] and "not installed" in rows["CRIU version"]["detail"]
    assert "make host" in rows["CRIU version"]["fix"]

    # An old one: it answers --version as CRIU 3.17 does, and fails its check.
    old = tmp_path / "criu"
    old.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Version: 3.17.1" && exit 0\n'
                   'echo "Looks bad." >&2; exit 1\n')
    old.chmod(0o755)
    res = dolly_cmd("doctor", "--json", env={**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"})
    rows = doctor_rows(res)
    assert not rows["CRIU version"]["ok"] and rows["CRIU version"]["detail"].startswith("3.17.1")
    assert not rows["criu check"]["ok"] and "make host" in rows["criu check"]["fix"]
    # Without Dolly's CRIU build, processes of other users dump only where dockerd has CAP_SYS_RESOURCE.
    dockerd = Engine.of(docker.from_env()).daemon_pid()
    with open(f"/proc/{dockerd}/status") as f:
        cap_eff = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
    other = rows["dump other users' processes"]
    assert other["ok"] == bool(cap_eff >> 24 & 1)
    assert other["ok"] or "make host" in other["fix"]

    # pycriu not importable: the CLI run by a Python that refuses to import it.
    hide = ("import sys; sys.modules['pycriu'] = None; sys.argv = ['dolly', 'doctor', '--json']; "
            "from dolly.cli import main; main()")
    res = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=120)
    rows = doctor_rows(res)
    assert res.returncode == 1 and rows["CRIU version"]["ok"]
    assert not rows["pycriu"]["ok"] and "make host" in rows["pycriu"]["fix"]
