"""Every code example in README.md and docs/*.md runs as written, in order, page by page.

A page is run as a reader would type it, in an empty folder of its own (the working directory of
its Python and its shell, deleted afterwards):

- A ```` ```python ```` block runs in the page's one Python namespace (in this process, like one
  interpreter the reader keeps open); a ```` ```sh ```` (or ```` ```bash ````) block runs in the
  page's one bash (``set -euo pipefail``), with this virtualenv's ``bin`` first on ``PATH`` (its
  ``dolly`` and ``pytest``). Blocks run in the page's order, Python and shell interleaved.
- A block with ``title="NAME"`` (Material shows the title above it) is a file the reader saves:
  it is written to NAME in the page's folder, not run; a later block uses it (a ``conftest.py``
  or test module that a ``sh`` block then runs ``pytest`` on, a ``.sql`` fixture).
- Not run, on purpose: ```` ```console ```` blocks are transcripts of steps that change the machine
  itself (``pip install`` from PyPI, ``make host``), which the test suite's own set-up has done;
  ```` ```text ```` blocks (and any other language: ``json``, ``yaml``, ``ini``) are output or
  configuration to read. Keep ``console`` blocks to those; everything else a page shows runs.

What a page needs beyond the engine it names in its text, and the test provides:

- ``DOLLY_SECOND_ENGINE``: the URL of a second Docker Engine prepared like the first (migration,
  a pull on the host that did not push). Here: the suite's isolated engine (``host_b_engine`` of
  tests/conftest.py: its own mount namespace, files and engine ID, as another host).
- ``DOLLY_REGISTRY``: ``HOST:PORT`` of an OCI registry. Here: Debian's docker-registry on
  loopback (tests/registries.py).

A page must clean up after itself (its last blocks do, as a reader would): the test then removes
whatever the page left anyway, pass or fail, and fails a page that left something. What the page
left: on the main engine, containers made while it ran that it names in its code or that Dolly
made (clones, labelled ``dolly.source``), networks made while it ran that it names, and
checkpoints taken while it ran; on the second
engine, every container and checkpoint made while it ran.
"""
from __future__ import annotations

import os
import queue
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import docker
import pytest

import dolly
from dolly._checkpoint import LAYER_IMAGE_REPOSITORY
from dolly._engine import Engine
from dolly._store import remove_unused_layer_images

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python", "sh", "bash"}
SHOWN = {"console", "text"}  # not run, on purpose (see the module's docstring)
BLOCK_TIMEOUT = 600.0

FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<info>.*)$")
ATTR = re.compile(r'([\w-]+)="([^"]*)"')


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    attrs: Dict[str, str]
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> List[Block]:
    """The fenced code blocks of a page, in order (fences at the start of a line)."""
    found: List[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m["fence"], m["info"].strip()
        lang = info.split()[0].lower() if info else ""
        body: List[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence):
            body.append(lines[j])
            j += 1
        found.append(Block(page, i + 1, lang, dict(ATTR.findall(info)), "\n".join(body) + "\n"))
        i = j + 1
    return found


# --- the conventions hold everywhere (no engine) ------------------------------------------------------

@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_says_whether_it_runs(page: Path) -> None:
    """Every block is run, a file, or a transcript or output by its language: none is left to
    guess (a block without a language would be skipped silently)."""
    unclear = [b.where for b in blocks(page) if "title" not in b.attrs and b.lang not in RUN | SHOWN
               and b.lang not in {"json", "yaml", "ini", "toml"}]
    assert unclear == [], f"blocks with no language, or one the docs test does not know: {unclear}"


def test_the_block_parser_reads_languages_titles_and_bodies(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text('text\n\n```python title="conftest.py"\nx = 1\n```\n\n````sh\n```\n````\n\n```text\nout\n```\n')
    found = blocks(page)
    assert [(b.lang, b.attrs, b.code) for b in found] == [
        ("python", {"title": "conftest.py"}, "x = 1\n"), ("sh", {}, "```\n"), ("text", {}, "out\n")]
    assert [b.line for b in found] == [3, 7, 11]


# --- the page's shell ----------------------------------------------------------------------------------

class Shell:
    """One bash for a page's ``sh`` blocks: variables, the folder and functions carry over."""

    def __init__(self, cwd: Path, scratch: Path, env: Dict[str, str]) -> None:
        self.scratch = scratch
        self.proc = subprocess.Popen(["bash", "--noprofile", "--norc"], cwd=cwd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.lines: queue.Queue[Optional[str]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.count = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, block: Block) -> str:
        """Run a block; its output. A failing command ends the shell (errexit), which fails the block."""
        self.count += 1
        script = self.scratch / f"block-{self.count}.sh"
        script.write_text(block.code)
        marker = f"__dolly_docs_block_{self.count}_done__"
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"set -euo pipefail\nsource {shlex.quote(str(script))}\necho {marker}\n")
        self.proc.stdin.flush()
        out: List[str] = []
        deadline = time.monotonic() + BLOCK_TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise AssertionError(f"{block.where}: still running after {BLOCK_TIMEOUT:.0f} s:\n"
                                     + "".join(out)) from None
            if line is None:
                code = self.proc.wait()
                raise AssertionError(f"{block.where}: the block failed (exit status {code}):\n{block.code}\n"
                                     f"--- its output ---\n" + "".join(out))
            if line.strip() == marker:
                return "".join(out)
            out.append(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
        self.proc.wait()


# --- what a page made ------------------------------------------------------------------------------

@dataclass
class EngineState:
    client: docker.DockerClient
    everything_new_is_the_pages: bool
    containers: set = field(default_factory=set)
    checkpoints: set = field(default_factory=set)
    layer_images: set = field(default_factory=set)
    networks: set = field(default_factory=set)

    @classmethod
    def of(cls, client: docker.DockerClient, *, everything_new_is_the_pages: bool) -> EngineState:
        state = cls(client, everything_new_is_the_pages)
        state.containers = {c.id for c in client.containers.list(all=True)}
        state.checkpoints = {(cp.container_id, cp.name) for cp in dolly.list_checkpoints(None, client=client)}
        state.layer_images = set(Engine.of(client).image_tags(LAYER_IMAGE_REPOSITORY))
        state.networks = {n.id for n in client.networks.list()}
        return state

    def leftovers(self, words: set) -> Dict[str, list]:
        """Remove what the page made and left; what that was."""
        left: Dict[str, list] = {"containers": [], "checkpoints": [], "networks": []}
        for c in self.client.containers.list(all=True):
            if c.id in self.containers or c.name.startswith("dolly-agent-"):
                continue
            labels = c.labels or {}
            if self.everything_new_is_the_pages or c.name in words or "dolly.source" in labels \
                    or "dolly.operation" in labels:
                left["containers"].append(c.name)
                c.remove(force=True, v=True)
        for cp in dolly.list_checkpoints(None, client=self.client):
            if (cp.container_id, cp.name) not in self.checkpoints:
                left["checkpoints"].append(f"{cp.container_name}/{cp.name}")
                dolly.remove_checkpoint(cp, client=self.client)
        for net in self.client.networks.list():
            if net.id not in self.networks and (self.everything_new_is_the_pages or net.name in words):
                left["networks"].append(net.name)
                net.remove()
        engine = Engine.of(self.client)
        if engine.files_are_local():
            made = set(engine.image_tags(LAYER_IMAGE_REPOSITORY)) - self.layer_images
            if made:
                remove_unused_layer_images(engine, only=made)
        return {k: v for k, v in left.items() if v}


def _words(page_blocks: List[Block]) -> set:
    """The names a page's code could give containers."""
    return set(re.findall(r"[A-Za-z0-9][A-Za-z0-9_.-]*", "".join(b.code for b in page_blocks)))


@pytest.fixture
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dolly-docs-") as d:
        yield Path(d)


ENGINE_PAGES = [p for p in PAGES if any(b.lang in RUN for b in blocks(p))]


@pytest.mark.engine
@pytest.mark.parametrize("page", ENGINE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_examples_of_the_page_run_in_order(page: Path, client: docker.DockerClient, folder: Path,
                                                 request: pytest.FixtureRequest,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    page_blocks = blocks(page)
    text = page.read_text()
    env_for_page: Dict[str, str] = {}
    second: Optional[docker.DockerClient] = None
    if "DOLLY_SECOND_ENGINE" in text:
        isolated = request.getfixturevalue("host_b_engine")
        env_for_page["DOLLY_SECOND_ENGINE"] = isolated.url
        second = isolated.client
    if "DOLLY_REGISTRY" in text:
        env_for_page["DOLLY_REGISTRY"] = request.getfixturevalue("registry").address
    for k, v in env_for_page.items():
        monkeypatch.setenv(k, v)
    venv_bin = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", f"{venv_bin}:{os.environ.get('PATH', '')}")
    monkeypatch.chdir(folder)
    scratch = Path(tempfile.mkdtemp(prefix="dolly-docs-scripts-"))

    states = [EngineState.of(client, everything_new_is_the_pages=False)]
    if second is not None:
        states.append(EngineState.of(second, everything_new_is_the_pages=True))
    namespace: dict = {"__name__": "__main__"}
    shell: Optional[Shell] = None
    passed = False
    try:
        for block in page_blocks:
            if "title" in block.attrs:
                target = folder / block.attrs["title"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(block.code)
            elif block.lang == "python":
                code = compile(block.code, f"<{block.where}>", "exec")
                try:
                    exec(code, namespace)  # the page's own example, as a reader runs it
                except Exception as e:
                    raise AssertionError(f"{block.where}: the block raised {type(e).__name__}: {e}\n"
                                         f"{block.code}") from e
            elif block.lang in {"sh", "bash"}:
                if shell is None:
                    shell = Shell(folder, scratch, dict(os.environ))
                print(shell.run(block))
        passed = True
    finally:
        if shell is not None:
            shell.close()
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
        for c in [v for v in namespace.values() if isinstance(v, docker.DockerClient)]:
            c.close()
        words = _words(page_blocks)
        left = {("main" if i == 0 else "second") + " engine": s.leftovers(words) for i, s in enumerate(states)}
        left = {k: v for k, v in left.items() if v}
    if passed:
        assert left == {}, f"{page.relative_to(ROOT)} left things behind (its last blocks must clean up): {left}"
