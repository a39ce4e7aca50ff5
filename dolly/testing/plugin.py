"""The hooks of Dolly's pytest plugin: a :class:`~dolly.testing.services.Plugin` per pytest
process, xdist's workers told the controller's run, a failed test's report given its clones' logs,
what the run made removed at its end, and the summary.

The ``pytest11`` entry point (``dolly = dolly.testing.plugin``) names this module: pytest takes
its hooks from it, so installing Dolly is enough.
"""
from __future__ import annotations

from typing import Any

import docker
import pytest

from .._engine import id_of
from .._start import LABEL_SOURCE
from .services import Plugin, _clones_key, _plugin_key


def pytest_configure(config: pytest.Config) -> None:
    # pycriu 4.2 calls protobuf's deprecated FieldDescriptor.label() for every field it reads:
    # Dolly's dependency, not the user's code, so it stays out of the user's test report (a
    # filter set at import would be undone by pytest's per-test warning capture).
    config.addinivalue_line("filterwarnings", r"ignore:label\(\) is deprecated:DeprecationWarning")
    config.stash[_plugin_key] = Plugin(config)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: hand the controller's run ID and owner to each worker."""
    plugin: Plugin = node.config.stash[_plugin_key]
    node.workerinput["dolly_run_id"] = plugin.run_id
    node.workerinput["dolly_owner"] = plugin.owner


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist: collect a worker's timings."""
    data = getattr(node, "workeroutput", {}).get("dolly_stats")
    if data:
        node.config.stash[_plugin_key].stats.merge(data)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for c in item.stash.get(_clones_key, []):
            # The warm source's log first (a server's start-up, its fixtures), then the clone's own:
            # what the service said during this test.
            source_id = (c.labels or {}).get(LABEL_SOURCE)
            if source_id:
                report.sections.append((f"dolly warm source of {c.name}, log until its checkpoint",
                                        _log_text(c.client, source_id)))
            report.sections.append((f"dolly clone {c.name} log", _log_text(c.client, id_of(c))))
    return report


def _log_text(client: Any, container_id: str) -> str:
    try:
        text = client.containers.get(container_id).logs(tail=200).decode(errors="replace")
    except docker.errors.DockerException as e:
        return f"(could not read the log: {e})"
    return text or "(empty)"


def pytest_sessionfinish(session: pytest.Session) -> None:
    session.config.stash[_plugin_key].finish()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    config.stash[_plugin_key].summary(terminalreporter)
