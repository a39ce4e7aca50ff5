"""Engines told apart for what they are, and checkpoints that know which engine holds them."""
from __future__ import annotations

import docker
import pytest

import dolly
import dolly._manifest
from dolly._engine import Engine
from helpers import BUSYBOX, COUNTER, ENGINE_B_URL, RUN_ID, TEST_LABEL, assert_counts_on, read_int


def test_engines_sharing_an_id_are_still_two(client, engine_b):
    # The second engine shares this host's /etc/docker, so Docker gives both the same ID.
    assert Engine.of(client).info()["ID"] == Engine.of(engine_b).info()["ID"]
    assert Engine.of(client).identity != Engine.of(engine_b).identity
    # Two clients of one engine are one engine, however they were made.
    again = docker.DockerClient(base_url=ENGINE_B_URL)
    try:
        assert Engine(again).identity == Engine.of(engine_b).identity
    finally:
        again.close()


@pytest.fixture
def on_b(client, engine_b):
    """A counter on engine b, removed after the test with what Dolly kept of it there."""
    b = Engine.of(engine_b)
    b.ensure_image(client.images.get(BUSYBOX).id, BUSYBOX, source=Engine.of(client))
    c = engine_b.containers.run(BUSYBOX, ["sh", "-c", COUNTER], detach=True, labels={TEST_LABEL: RUN_ID})
    yield c
    for made in engine_b.containers.list(all=True, filters={"label": f"{TEST_LABEL}={RUN_ID}"}):
        made.remove(force=True)
    for cp in dolly.list_checkpoints(c.id, engine_b):
        dolly.remove_checkpoint(cp)


def test_a_checkpoint_knows_its_engine(on_b, client, engine_b, tmp_path):
    before = read_int(on_b)  # the counter can only be at or past this at the checkpoint
    cp = dolly.checkpoint(on_b.id, "knows", client=engine_b)
    assert cp.client is engine_b
    assert dolly.get_checkpoint(on_b.id, "knows", engine_b).client is engine_b
    # No client= after the checkpoint: clone, export and remove follow it to its engine.
    (clone,) = dolly.clone(cp, 1)
    assert engine_b.containers.get(clone.id).status == "running"
    with pytest.raises(docker.errors.NotFound):
        client.containers.get(clone.id)
    assert_counts_on(clone, before)
    path = dolly.export(cp, tmp_path / "b.dolly", compression="none")
    assert dolly._manifest.read_manifest(path)["source"]["engine_id"] == Engine.of(engine_b).info()["ID"]
