"""An agent that goes in the middle of an operation (dolly/_hosts/channel.py): its exec's process
killed on the engine's host, or its container stopped, while the caller streams to it.

The engine ends such an exec's output, but not the connection's other way: it copies the
connection into the exec's stdin fifo, which it holds open itself, so once the agent is gone the
fifo fills and a write into the connection would block for ever. Each test here writes more than
every buffer on the way holds into an agent that is gone, and fails (rather than hangs: the 60 s
of ``_within`` tell a hang, they time nothing) unless the caller gets an error from dolly.errors.

host_b (tests/engines.py IsolatedEngine) is a dockerd in a mount namespace of its own, reached
through its agent; the agent shares the host's PID namespace, so an exec's ``Pid``
(ExecInspect) is this machine's.
"""
from __future__ import annotations

import io
import os
import re
import signal
import threading
import time
from typing import Any, Callable, Dict, List

import docker
import pytest
from test_remote import _agent_processes, _big_bundle, _idle_agent, _within

import dolly
from dolly import errors
from dolly._engine import Engine
from dolly._hosts.agent import agent_name
from dolly._hosts.channel import Channel

KILLED = r"ended before it answered \(killed by signal 9, exit 137\)"
# A stopped container's execs are forgotten by the engine: how they ended with them.
GONE = {"kill": KILLED, "stop": r"ended before it answered \(its exit is unknown: its container stopped"}


def _running_exec(client, op: str) -> Dict[str, Any]:
    """ExecInspect of the exec of ``op`` running in the engine's agent, waiting up to 30 s for it."""
    deadline = time.monotonic() + 30
    while True:
        for agent in client.containers.list(filters={"name": agent_name()}):
            for exec_id in agent.attrs.get("ExecIDs") or []:
                info = client.api.exec_inspect(exec_id)
                if info["Running"] and op in info["ProcessConfig"]["arguments"]:
                    return info
        assert time.monotonic() < deadline, f"no exec of {op} runs in the agent"
        time.sleep(0.05)


def _ended(client, exec_id: str) -> bool:
    try:
        return not client.api.exec_inspect(exec_id)["Running"]
    except docker.errors.NotFound:
        return True  # forgotten with its stopped container


def _until(what: str, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not done():
        assert time.monotonic() < deadline, f"not {what} after 30 s"
        time.sleep(0.05)


class _Paused(io.RawIOBase):
    """``data`` as a stream read once, in order; ``at_half()`` runs in the reader's thread (the
    import's) before the second half is given."""

    def __init__(self, data: bytes, at_half: Callable[[], None]) -> None:
        super().__init__()
        self._data, self._at_half, self._at, self._paused = data, at_half, 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self._paused and self._at >= len(self._data) // 2:
            self._paused = True
            self._at_half()
        n = min(len(b), 1 << 16, len(self._data) - self._at)
        b[:n] = self._data[self._at:self._at + n]
        self._at += n
        return n


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_an_import_whose_agent_goes_midway_ends_with_an_error_and_leaves_nothing(how, run, host_b, host_b_engine,
                                                                                  tmp_path, keys):
    """Half of a bundle of more than 8 MiB streamed into host_b's agent, which stages it; then its
    exec's process is killed (``kill``), or the agent's container stopped (``stop``), and the
    caller has 4 MiB left to write. HostNotReady says the agent was killed (it used to block for
    ever in sendall); the staging is discarded, nothing is imported, nothing else is left, and the
    same bundle imports afterwards (through a new agent, for ``stop``)."""
    private, public = keys
    cp, path = _big_bundle(run, tmp_path, private, "goes")
    spool = host_b_engine.data_root / "dolly" / "spool"
    others = sorted(c.id for c in host_b.containers.list(all=True) if not c.name.startswith("dolly-agent-"))
    _idle_agent(host_b)
    seen: List[str] = []

    def go() -> None:
        """The agent has read part of the bundle and staged it when it goes."""
        _until("staging", lambda: bool(list(spool.glob("import-*"))))
        seen.extend(p.name for p in spool.glob("import-*"))
        info = _running_exec(host_b, "stage_import")
        if how == "kill":
            os.kill(info["Pid"], signal.SIGKILL)
        else:
            (agent,) = host_b.containers.list(filters={"name": agent_name()})
            agent.stop(timeout=1)
        _until("ended", lambda: _ended(host_b, info["ID"]))

    stream = _Paused(path.read_bytes(), go)
    with pytest.raises(errors.HostNotReady, match=GONE[how]):
        _within(60, lambda: dolly.import_bundle(stream, client=host_b, trusted_keys=[public]))
    assert len(seen) == 1
    assert list(spool.glob("import-*")) == []  # the staging the agent had made, discarded
    assert [c for c in dolly.list_checkpoints(client=host_b) if c.container_id == cp.container_id] == []
    assert sorted(c.id for c in host_b.containers.list(all=True)
                  if not c.name.startswith("dolly-agent-")) == others
    assert [a.status for a in host_b.containers.list(all=True, filters={"name": agent_name()})] == ["running"]
    assert _agent_processes(host_b) == []
    imported = dolly.import_bundle(path, client=host_b, trusted_keys=[public])
    try:
        assert dolly.list_checkpoints(cp.container_id, host_b) == [imported]
    finally:
        dolly.remove_checkpoint(imported)


def _flood(duplex) -> Callable[[], None]:
    """64 MiB sent to ``duplex``: more than the pipes and socket buffers on the way hold."""

    def send() -> None:
        for _ in range(64):
            duplex.send(bytes(1 << 20))

    return send


def test_a_duplex_send_into_an_agent_killed_midway_raises(host_b, host_b_engine):
    """A post-copy target's exchange (its agent listens for the lazy-pages daemon, which never
    comes here): its agent reads a first chunk, then waits for the daemon, so a flood of sends
    blocks, as it should; then its exec's process is killed. The blocked send raises HostNotReady
    saying so (it used to block for ever), and every later send too, at once."""
    _idle_agent(host_b)
    duplex = Channel.of(Engine.of(host_b)).duplex("post_copy_target")
    relay = None
    try:
        relay = duplex.control("relay", timeout=60)
        flood = threading.Thread(target=_catching(_flood(duplex), ended := []), name="dolly-test-flood", daemon=True)
        flood.start()
        flood.join(2)
        assert flood.is_alive(), "the agent took 64 MiB it does not read"
        os.kill(_running_exec(host_b, "post_copy_target")["Pid"], signal.SIGKILL)
        flood.join(60)
        if flood.is_alive():
            pytest.fail("still blocked 60 s after the agent was killed")
        (error,) = ended
        assert isinstance(error, errors.HostNotReady) and re.search(KILLED, str(error)), repr(error)
        with pytest.raises(errors.HostNotReady, match=KILLED):
            duplex.send(b"late")
        assert duplex.recv() == b""
    finally:
        duplex.close()
        if relay is not None:  # the relay's socket file, which the killed agent could not remove
            (host_b_engine.data_root / "dolly" / "spool" / f"pages-{relay:016x}.sock").unlink(missing_ok=True)
    assert _agent_processes(host_b) == []


def _catching(call: Callable[[], None], into: List[BaseException]) -> Callable[[], None]:
    """``call``, what it raises appended to ``into`` (a thread's target)."""

    def run() -> None:
        try:
            call()
        except BaseException as e:  # handed to the test's thread
            into.append(e)

    return run


def test_a_duplex_send_into_an_agent_that_failed_raises_its_error(host_b):
    """A post-copy source's exchange for a container host_b does not have: the agent writes
    ContainerNotFound and reads no more; a send raises that error (it used to block for ever)."""
    _idle_agent(host_b)
    duplex = Channel.of(Engine.of(host_b)).duplex("post_copy_source", container="dolly-test-no-such-container",
                                                  name="nothing")
    try:
        with pytest.raises(errors.ContainerNotFound, match="dolly-test-no-such-container"):
            _within(60, _flood(duplex))
        with pytest.raises(errors.ContainerNotFound):
            duplex.control("ready", timeout=10)
    finally:
        duplex.close()
    assert _agent_processes(host_b) == []
