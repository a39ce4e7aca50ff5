"""Readiness checks: when is a service warm enough to checkpoint?

One set serves the API, the pytest fixture and the command line. A check is any callable that
takes a docker-py ``Container`` and returns true when the service is ready:

    dolly.ready.http(8000, "/health")     an HTTP answer below 400 from the container's IP
    dolly.ready.tcp(5432)                 a TCP connection to the container's IP is accepted
    dolly.ready.log("listening")          a line of the container's log contains the text
    dolly.ready.exec(["test", "-f", "/tmp/ready"])   a command inside exits 0
    lambda c: ...                         your own

:func:`wait` polls one until it passes, the container dies, or the timeout runs out.
"""
from __future__ import annotations

import shlex
import socket
from dataclasses import dataclass
from http.client import HTTPConnection
from typing import Callable, List, Optional, Sequence, Union

from docker.models.containers import Container
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from .errors import ContainerNotRunning, DollyError, NotReady

__all__ = ["Check", "http", "tcp", "log", "exec", "wait", "ip_address"]

Check = Callable[[Container], bool]


def ip_address(container: Container, network: Optional[str] = None) -> str:
    """The container's IP address on ``network`` (default: its first network with one).

    Raises:
        DollyError: it has no IP address there.
    """
    networks = container.attrs.get("NetworkSettings", {}).get("Networks") or {}
    for name, ep in networks.items():
        if (network is None or name == network) and ep.get("IPAddress"):
            return str(ep["IPAddress"])
    raise DollyError(f"container {container.name} has no IP address" + (f" on {network}" if network else ""))


@dataclass(frozen=True)
class Http:
    """An HTTP GET to the container's own IP answers with a status below 400."""

    port: int
    path: str = "/"
    network: Optional[str] = None
    request_timeout: float = 2.0

    def __call__(self, container: Container) -> bool:
        conn = HTTPConnection(ip_address(container, self.network), self.port, timeout=self.request_timeout)
        try:
            conn.request("GET", self.path)
            return conn.getresponse().status < 400
        except OSError:
            return False
        finally:
            conn.close()

    def __str__(self) -> str:
        return f"HTTP GET :{self.port}{self.path}"


@dataclass(frozen=True)
class Tcp:
    """A TCP connection to the container's own IP and ``port`` is accepted (then closed)."""

    port: int
    network: Optional[str] = None
    connect_timeout: float = 2.0

    def __call__(self, container: Container) -> bool:
        try:
            with socket.create_connection((ip_address(container, self.network), self.port),
                                          timeout=self.connect_timeout):
                return True
        except OSError:
            return False

    def __str__(self) -> str:
        return f"TCP connect :{self.port}"


@dataclass(frozen=True)
class Log:
    """A line of the container's log (stdout and stderr) contains ``text``."""

    text: str

    def __call__(self, container: Container) -> bool:
        return self.text in container.logs().decode(errors="replace")

    def __str__(self) -> str:
        return f"log line containing {self.text!r}"


@dataclass(frozen=True)
class Exec:
    """A command run inside the container exits with status 0."""

    command: Sequence[str]

    def __call__(self, container: Container) -> bool:
        return container.exec_run(list(self.command)).exit_code == 0

    def __str__(self) -> str:
        return f"exec {shlex.join(self.command)}"


def http(port: int, path: str = "/", *, network: Optional[str] = None) -> Http:
    """Ready when ``GET http://<container IP>:<port><path>`` answers below 400."""
    return Http(port, path, network)


def tcp(port: int, *, network: Optional[str] = None) -> Tcp:
    """Ready when a TCP connection to ``<container IP>:<port>`` is accepted."""
    return Tcp(port, network)


def log(text: str) -> Log:
    """Ready when the container's log contains ``text``."""
    return Log(text)


def exec(command: Union[str, Sequence[str]]) -> Exec:  # shadows the builtin: the name users expect
    """Ready when ``command`` (a list, or a string split like a shell would) exits 0 inside."""
    return Exec(tuple(shlex.split(command) if isinstance(command, str) else command))


def wait(container: Container, check: Check, *, timeout: float = 60.0, interval: float = 0.1) -> None:
    """Poll ``check`` until it passes.

    Raises:
        NotReady: the timeout ran out; the message ends with the container's last log lines.
        ContainerNotRunning: the container stopped while waiting (its last log lines included).
    """

    def attempt() -> bool:
        container.reload()
        if container.status not in ("running", "created", "restarting"):
            raise ContainerNotRunning(
                f"container {container.name} {container.status} before it was ready"
                + _tail(container)
            )
        return bool(check(container))

    polling = Retrying(
        stop=stop_after_delay(timeout),
        wait=wait_fixed(interval),
        retry=retry_if_result(lambda ok: not ok),
    )
    try:
        polling(attempt)
    except RetryError:
        raise NotReady(
            f"container {container.name} was not ready ({check}) after {timeout:g} s" + _tail(container),
            logs=_last_lines(container),
        ) from None


def _last_lines(container: Container, n: int = 20) -> List[str]:
    try:
        return container.logs(tail=n).decode(errors="replace").splitlines()
    except Exception:  # the container may be gone; the error is about readiness
        return []


def _tail(container: Container) -> str:
    lines = _last_lines(container)
    return ("; last log lines:\n  " + "\n  ".join(lines)) if lines else "; its log is empty"
