"""The `dolly` command: checkpoint, restore and clone from a shell.

Tables for people, ``--json`` for scripts, a progress bar for several clones, and errors in one
line (``--debug`` shows the traceback). Exit codes: 0 success; 1 a Dolly error, a failing
``doctor`` line, or a ``prune`` answered "no"; 2 a usage error; 130 interrupted.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import click
import docker
import docker.utils
from docker.models.containers import Container
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

import dolly
from dolly import _formats as formats, policy, ready, trust
from dolly._catalog import remove_pruned
from dolly._checkpoint import Checkpoint
from dolly._dump import DEFAULT_MAX_LAYER_BYTES
from dolly._engine import Engine
from dolly.errors import CriuError, DollyError, InvalidArgument

out = Console()
err = Console(stderr=True)


class Context:
    def __init__(self, as_json: bool, debug: bool, host: Optional[str]) -> None:
        self.as_json = as_json
        self.debug = debug
        self.host = host
        self._client: Optional[docker.DockerClient] = None

    @property
    def client(self) -> Optional[docker.DockerClient]:
        if self._client is None:
            self._client = client_for(self.host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock")
        return self._client


API_VERSION = "1.41"


def client_for(url: str) -> docker.DockerClient:
    """A client of the engine at ``url``, with TLS as docker's own CLI takes it from the
    environment (DOCKER_TLS_VERIFY, DOCKER_CERT_PATH) for a tcp:// engine."""
    # A fixed API version (what Dolly needs, which Docker 20.10 and later speak): without it, the
    # client asks the engine at once, and an engine that does not answer fails here, raw, before
    # `dolly doctor` can report it.
    kwargs: Dict[str, Any] = {**docker.utils.kwargs_from_env(), "base_url": url, "version": API_VERSION}
    return docker.DockerClient(**kwargs)


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn Dolly's errors into one line on stderr and exit code 1; take ``--json`` after the
    command too (``dolly ls --json``), as well as before it."""

    @functools.wraps(fn)
    @click.pass_obj
    def wrapper(ctx: Context, /, *args: Any, json_after: bool = False, **kwargs: Any) -> Any:
        ctx.as_json = ctx.as_json or json_after
        try:
            return fn(ctx, *args, **kwargs)
        except (DollyError, docker.errors.DockerException) as e:
            if ctx.debug:
                raise
            line = str(e).splitlines()[0]
            if isinstance(e, CriuError) and e.log_path:
                line += f" (CRIU log: {e.log_path})"
            err.print(f"[red]error:[/red] {type(e).__name__}: {line}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)

    return click.option("--json", "json_after", is_flag=True, help="Print JSON instead of tables.")(wrapper)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("-H", "--host", envvar="DOCKER_HOST",
              help="Docker Engine URL (default: DOCKER_HOST or the local socket).")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=lambda c, p, v: _versions(c, v),
              help="Print the versions of Dolly, CRIU and the engine, and exit.")
@click.pass_context
def cli(ctx: click.Context, as_json: bool, debug: bool, host: Optional[str]) -> None:
    """Checkpoint, restore and clone running Docker containers with CRIU."""
    ctx.obj = Context(as_json, debug, host)


def _versions(ctx: click.Context, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from dolly._criu import version as criu_version

    criu_v = criu_version()
    try:
        engine_v = client_for(os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock").version()["Version"]
    except docker.errors.DockerException as e:
        engine_v = f"not reachable ({str(e).splitlines()[0][:80]})"
    click.echo(f"dolly {dolly.__version__}\ncriu {'.'.join(map(str, criu_v)) if criu_v else 'not installed'}\n"
               f"docker engine {engine_v}")
    ctx.exit(0)


@cli.command()
@command
def doctor(ctx: Context) -> None:
    """Check the engine and CRIU, with how to fix each failing line."""
    report = dolly.check_host(ctx.client)
    if ctx.as_json:
        _print_json([c.__dict__ for c in report.checks])
    else:
        table = Table(box=None)
        for col in ("", "check", "found", "fix"):
            table.add_column(col)
        for c in report.checks:
            table.add_row("[green]ok[/green]" if c.ok else "[red]FAIL[/red]", c.name, c.detail, "" if c.ok else c.fix)
        out.print(table)
    if not report.ok:
        sys.exit(1)


@cli.command("checkpoint")
@click.argument("container")
@click.argument("name", required=False)
@click.option("--stop", is_flag=True, help="Stop the container after the dump (default: it keeps running).")
@click.option("--max-layer-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_LAYER_BYTES, show_default=True,
              help="Refuse a writable layer larger than this (allocated bytes).")
@click.option("--tcp-established", is_flag=True,
              help="Take a container holding established TCP connections (keep-alive clients, pools): "
                   "the dump carries them; clones and restores start with them closed.")
@command
def checkpoint_cmd(ctx: Context, container: str, name: Optional[str], stop: bool, max_layer_bytes: int,
                   tcp_established: bool) -> None:
    """Checkpoint a running CONTAINER (memory and files) as NAME."""
    with err.status(f"checkpointing {container}"):
        cp = dolly.checkpoint(container, name, leave_running=not stop, max_layer_bytes=max_layer_bytes,
                              tcp_established=tcp_established, client=ctx.client)
    _print_checkpoints(ctx, [cp])


@cli.command("restore")
@click.argument("container")
@click.argument("checkpoint")
@click.option("--name", help="The new container's name (default <source>-clone-<k>).")
@click.option("--network", help="Join this network instead of the source's.")
@command
def restore_cmd(ctx: Context, container: str, checkpoint: str, name: Optional[str], network: Optional[str]) -> None:
    """Start a new container from CONTAINER's CHECKPOINT."""
    cp = dolly.get_checkpoint(container, checkpoint, ctx.client)
    with err.status(f"restoring {checkpoint}"):
        c = dolly.restore(cp, name=name, network=network, client=ctx.client)
    _print_containers(ctx, [c])


@cli.command("reset")
@click.argument("container")
@click.argument("checkpoint")
@command
def reset_cmd(ctx: Context, container: str, checkpoint: str) -> None:
    """Put CONTAINER back at CHECKPOINT (its own, or the one it was restored from): same name, hostname,
    host ports and, where the network allows, address."""
    cp = dolly.get_checkpoint(container, checkpoint, ctx.client)
    with err.status(f"resetting {container}"):
        c = dolly.reset(container, cp, client=ctx.client)
    _print_containers(ctx, [c])


@cli.command("clone")
@click.argument("container")
@click.argument("checkpoint")
@click.option("-n", "count", type=click.IntRange(min=1), default=1, show_default=True, help="How many clones.")
@click.option("--prefix", help="Name clones <prefix>-<k> (default <source>-clone).")
@click.option("--network", "networks", multiple=True,
              help="Join this network instead of the source's; repeat it to spread the clones over several.")
@command
def clone_cmd(ctx: Context, container: str, checkpoint: str, count: int, prefix: Optional[str],
              networks: List[str]) -> None:
    """Start new containers (-n of them, default 1) from CONTAINER's CHECKPOINT, each with its own identity."""
    cp = dolly.get_checkpoint(container, checkpoint, ctx.client)
    columns = [TextColumn("cloning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True, disable=count == 1 or not err.is_terminal) as bar:
        task = bar.add_task("clone", total=count)
        clones = dolly.clone(cp, count, name_prefix=prefix, client=ctx.client, network=list(networks) or None,
                             progress=lambda _: bar.advance(task))
    _print_containers(ctx, clones)


@cli.command("ls")
@click.argument("container", required=False)
@command
def ls_cmd(ctx: Context, container: Optional[str]) -> None:
    """List the checkpoints of CONTAINER, or of every container."""
    _print_checkpoints(ctx, dolly.list_checkpoints(container, ctx.client))


@cli.command("rm")
@click.argument("container")
@click.argument("checkpoints", nargs=-1, required=True)
@command
def rm_cmd(ctx: Context, container: str, checkpoints: List[str]) -> None:
    """Remove CONTAINER's CHECKPOINTS."""
    for name in checkpoints:
        dolly.remove_checkpoint(dolly.get_checkpoint(container, name, ctx.client), ctx.client)
        if not ctx.as_json:
            out.print(f"removed {name}")
    if ctx.as_json:
        _print_json({"removed": list(checkpoints)})


@cli.command("prune")
@click.option("-a", "--all", "all_containers", is_flag=True,
              help="Every checkpoint, not only those of removed containers (imported ones too).")
@click.option("--older-than", type=str, metavar="DURATION",
              help="Only checkpoints taken longer ago than this (90s, 30m, 24h, 7d, 1h30m).")
@click.option("--label", "label_args", multiple=True, metavar="KEY=VALUE",
              help="Only checkpoints of containers that carried this label (repeatable).")
@click.option("--dry-run", is_flag=True, help="Remove nothing; list what would go.")
@click.option("--all-users", is_flag=True, help="Other users' checkpoints too (by default only those you took).")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@command
def prune_cmd(ctx: Context, all_containers: bool, older_than: Optional[str], label_args: List[str], dry_run: bool,
              all_users: bool, force: bool) -> None:
    """Remove checkpoints of removed containers (with --all: every checkpoint)."""
    age = _duration(older_than) if older_than is not None else None
    if any("=" not in a for a in label_args):
        raise click.BadParameter("give labels as KEY=VALUE", param_hint="--label")
    labels = dict(a.split("=", 1) for a in label_args) or None
    if force or dry_run:
        _print_prune(ctx, dolly.prune(all_containers=all_containers, older_than=age, labels=labels, dry_run=dry_run,
                                      all_users=all_users, client=ctx.client))
        return
    found = dolly.prune(all_containers=all_containers, older_than=age, labels=labels, dry_run=True,
                        all_users=all_users, client=ctx.client)
    if found.checkpoints:
        what = "every checkpoint" if all_containers else "the checkpoints of removed containers"
        click.confirm(f"This removes {what}{f' older than {older_than}' if age else ''}: "
                      f"{len(found.checkpoints)}, {found.reclaimed / 2**20:.1f} MiB. Continue?", abort=True, err=True)
    # Exactly what was confirmed: not what a second look would find.
    _print_prune(ctx, dataclasses.replace(remove_pruned(Engine.of(ctx.client), found.checkpoints),
                                          others=found.others))


def _duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``24h``, ``7d`` or a sum of them (``1h30m``), as ``docker ... --filter until=`` takes them."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)([smhd])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 30m, 24h, 7d or 1h30m",
                                 param_hint="--older-than")
    try:
        return timedelta(seconds=sum(int(n) * units[u] for n, u in parts))
    except OverflowError:
        raise click.BadParameter(f"{text!r} is longer than any checkpoint has lived",
                                 param_hint="--older-than") from None


def _print_prune(ctx: Context, report: dolly.PruneReport) -> None:
    if ctx.as_json:
        _print_json({"dry_run": report.dry_run, "reclaimed_bytes": report.reclaimed, "others_kept": report.others,
                     "checkpoints": [_checkpoint_dict(cp, size=False) for cp in report.checkpoints]})
        return
    verb = "would remove" if report.dry_run else "removed"
    for cp in report.checkpoints:
        out.print(f"{verb} {cp.container_name} {cp.name}", highlight=False)
    out.print(f"{'Would reclaim' if report.dry_run else 'Reclaimed'} {report.reclaimed / 2**20:.1f} MiB "
              f"({len(report.checkpoints)} checkpoints)", highlight=False)
    if report.others:
        out.print(f"Kept {report.others} checkpoint(s) another user took (or an older Dolly that recorded no one): "
                  "--all-users takes them too", highlight=False)


def _working(text: str) -> Progress:
    """A bar for steps whose length is not known up front (export, import, migrate)."""
    return Progress(TextColumn(text), BarColumn(), TimeElapsedColumn(), console=err, transient=True,
                    disable=not err.is_terminal)


def _bytes_bar(text: str) -> Progress:
    """A bar for a stream of known length."""
    return Progress(TextColumn(text), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
                    console=err, transient=True, disable=not err.is_terminal)


@cli.command("keygen")
@click.argument("private_pem", type=click.Path(dir_okay=False))
@click.argument("public_pem", type=click.Path(dir_okay=False))
@command
def keygen_cmd(ctx: Context, private_pem: str, public_pem: str) -> None:
    """Make an Ed25519 key pair for signing bundles: PRIVATE_PEM (0600) and PUBLIC_PEM."""
    for path in (private_pem, public_pem):
        if os.path.lexists(path):  # both refused before either is written: never half a pair
            raise InvalidArgument(f"{path} exists already; keygen never overwrites a key")
    private, public = trust.generate_keypair()
    trust.save_private_key(private, private_pem)
    trust.save_public_key(public, public_pem)
    if ctx.as_json:
        _print_json({"key_id": trust.key_id(public), "private": private_pem, "public": public_pem})
    else:
        out.print(f"key {trust.key_id(public)}: {private_pem}, {public_pem}")


@cli.command("sign")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "key_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The PEM private key to sign with.")
@click.option("--expires-in", type=click.FloatRange(min=0, min_open=True), default=168.0, show_default=True,
              help="Hours the signature stays fresh.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write it (default PATH.sig).")
@command
def sign_cmd(ctx: Context, path: str, key_file: str, expires_in: float, output: Optional[str]) -> None:
    """Write a detached signature of the archive at PATH (Podman's or the kubelet's, which have no
    place for one), for `dolly import --signature`."""
    written = trust.sign_file(trust.load_private_key(key_file), path, expires_in=timedelta(hours=expires_in),
                              out=output)
    if ctx.as_json:
        _print_json({"signature": str(written)})
    else:
        out.print(str(written))


@cli.command("export")
@click.argument("container")
@click.argument("checkpoint")
@click.argument("path", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["dolly", "oci", "podman"]), default="dolly", show_default=True,
              help="A bundle file, a checkpoint OCI image (an OCI image layout folder at PATH), or an archive "
                   "that `podman container restore --import` restores.")
@click.option("--sign", "sign_key", type=click.Path(exists=True, dir_okay=False),
              help="Sign with this PEM private key.")
@click.option("--compression", type=click.Choice(["zstd", "gzip", "none"]), default="zstd", show_default=True)
@click.option("--encrypt", "key_file", type=click.Path(exists=True, dir_okay=False),
              help="Encrypt with the 32-byte key in this file (AES-256-GCM).")
@click.option("--expires-in", type=click.FloatRange(min=0, min_open=True), default=168.0, show_default=True,
              help="Hours the bundle stays fresh.")
@command
def export_cmd(ctx: Context, container: str, checkpoint: str, path: str, fmt: str, sign_key: Optional[str],
               compression: str, key_file: Optional[str], expires_in: float) -> None:
    """Write CONTAINER's CHECKPOINT as a bundle at PATH (or a checkpoint OCI image, or Podman's
    archive), for another engine."""
    cp = dolly.get_checkpoint(container, checkpoint, ctx.client)
    signer = trust.load_private_key(sign_key) if sign_key else None
    with _working("exporting") as bar:
        bar.add_task("export", total=None)
        written = dolly.export(cp, path, format=fmt, signer=signer, compression=compression, client=ctx.client,
                               encryption_key=_read_key(key_file), expires_in=timedelta(hours=expires_in))
    size = sum(p.stat().st_size for p in written.rglob("*") if p.is_file()) if written.is_dir() else \
        written.stat().st_size
    if ctx.as_json:
        _print_json({"path": str(written), "format": fmt, "size_bytes": size})
    else:
        out.print(f"{written} ({size / 2**20:.1f} MiB)")


@cli.command("import")
@click.argument("path", type=click.Path(exists=True))
@click.option("--trust", "trusted", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A PEM public key whose signature is accepted (repeatable).")
@click.option("--allow-unsigned", is_flag=True, help="Accept a bundle without a trusted signature.")
@click.option("--image-from", help="Engine URL to copy the image from when this engine lacks it.")
@click.option("--decrypt", "key_file", type=click.Path(exists=True, dir_okay=False),
              help="The 32-byte key file the bundle was encrypted with.")
@click.option("--allow", "allow", multiple=True, type=click.Choice(sorted(policy.ITEMS)),
              help="Let the bundle's container have this host access (repeatable); see README.")
@click.option("--signature", type=click.Path(exists=True, dir_okay=False),
              help="A detached signature of a Podman or kubelet archive (`dolly sign`), by a --trust key.")
@command
def import_cmd(ctx: Context, path: str, trusted: List[str], allow_unsigned: bool, image_from: Optional[str],
               key_file: Optional[str], allow: List[str], signature: Optional[str]) -> None:
    """Verify the bundle at PATH and make it a checkpoint on this engine. PATH may also be a
    checkpoint OCI image (an OCI image layout folder), or Podman's or the kubelet's checkpoint
    archive (told apart by content; these carry no signature: --signature, or --allow-unsigned).

    By default its container may not be privileged, mount host paths or named volumes, use host
    devices, add capabilities, join host namespaces, change security options, set sysctls or a
    cgroup parent, or log off the host; --allow lets it, item by item."""
    source = client_for(image_from) if image_from else None
    keys = [trust.load_public_key(k) for k in trusted]
    if Path(path).is_dir():  # a checkpoint OCI image: its layer is checked, then read
        path = str(formats.oci_layer(Path(path))[0])
    if signature is not None:  # checked over the file as it is read: no bar around the stream
        with _working(f"importing {Path(path).name}") as bar:
            bar.add_task("import", total=None)
            cp = dolly.import_bundle(path, client=ctx.client, trusted_keys=keys, allow_unsigned=allow_unsigned,
                                     allow=allow, image_source=source, encryption_key=_read_key(key_file),
                                     signature=signature)
        _print_checkpoints(ctx, [cp])
        return
    # The bundle is read once, as a stream: the bar follows the bytes read (to this engine, or
    # on their way to another host's).
    with _bytes_bar(f"importing {Path(path).name}") as bar, \
            bar.wrap_file(open(path, "rb"), total=Path(path).stat().st_size, description="import") as stream:
        cp = dolly.import_bundle(stream, client=ctx.client, trusted_keys=keys, allow_unsigned=allow_unsigned,
                                 allow=allow, image_source=source, encryption_key=_read_key(key_file))
    _print_checkpoints(ctx, [cp])


@cli.command("push")
@click.argument("container")
@click.argument("checkpoint")
@click.argument("reference")
@click.option("--sign", "sign_key", type=click.Path(exists=True, dir_okay=False),
              help="Sign with this PEM private key (pulls then check it).")
@click.option("--expires-in", type=click.FloatRange(min=0, min_open=True), default=168.0, show_default=True,
              help="Hours the pushed checkpoint stays fresh.")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), help="The CA of the registry's TLS.")
@command
def push_cmd(ctx: Context, container: str, checkpoint: str, reference: str, sign_key: Optional[str],
             expires_in: float, ca_file: Optional[str]) -> None:
    """Push CONTAINER's CHECKPOINT to an OCI registry as REFERENCE (HOST:PORT/REPO:TAG); only the
    pieces the registry lacks are uploaded. Credentials come from Docker's config.json."""
    cp = dolly.get_checkpoint(container, checkpoint, ctx.client)
    with _working(f"pushing to {reference}") as bar:
        bar.add_task("push", total=None)
        report = dolly.push(cp, reference, signer=trust.load_private_key(sign_key) if sign_key else None,
                            expires_in=timedelta(hours=expires_in), ca_file=ca_file, client=ctx.client)
    if ctx.as_json:
        _print_json(dataclasses.asdict(report))
    else:
        out.print(f"{report.reference} ({report.tag}): {report.uploaded} of {report.blobs} blobs uploaded, "
                  f"{report.bytes_uploaded / 2**20:.1f} of {report.bytes / 2**20:.1f} MiB, "
                  f"{report.seconds:.2f} s", highlight=False)


@cli.command("pull")
@click.argument("reference")
@click.option("--trust", "trusted", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A PEM public key whose signature is accepted (repeatable).")
@click.option("--allow-unsigned", is_flag=True, help="Accept a checkpoint pushed without a signature.")
@click.option("--image-from", help="Engine URL to copy the image from when this engine lacks it.")
@click.option("--allow", "allow", multiple=True, type=click.Choice(sorted(policy.ITEMS)),
              help="Let the checkpoint's container have this host access (repeatable); see README.")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), help="The CA of the registry's TLS.")
@command
def pull_cmd(ctx: Context, reference: str, trusted: List[str], allow_unsigned: bool, image_from: Optional[str],
             allow: List[str], ca_file: Optional[str]) -> None:
    """Pull a checkpoint pushed to REFERENCE (HOST:PORT/REPO:TAG or ...@sha256:...), check its
    signature before anything is fetched, and make it a checkpoint on this engine."""
    with _working(f"pulling {reference}") as bar:
        bar.add_task("pull", total=None)
        cp = dolly.pull(reference, client=ctx.client, trusted_keys=[trust.load_public_key(k) for k in trusted],
                        allow_unsigned=allow_unsigned, allow=allow, ca_file=ca_file,
                        image_source=client_for(image_from) if image_from else None)
    _print_checkpoints(ctx, [cp])


@cli.command("migrate")
@click.argument("container")
@click.option("--to", "target", required=True, help="The target engine's URL (unix://, tcp://, ssh://).")
@click.option("--drop-volumes", is_flag=True,
              help="Move a container that has volumes: it gets fresh ones there; the old ones stay here.")
@click.option("--rebind-mounts", is_flag=True,
              help="Move a container that has bind mounts: there it binds the target host's paths.")
@click.option("--post-copy", is_flag=True,
              help="Run it on the target before its memory is there; the memory follows (shorter downtime).")
@command
def migrate_cmd(ctx: Context, container: str, target: str, drop_volumes: bool, rebind_mounts: bool,
                post_copy: bool) -> None:
    """Move a running CONTAINER to another engine, memory and files, under the same name."""
    with _working(f"migrating {container}") as bar:
        bar.add_task("migrate", total=None)
        moved = dolly.migrate(container, client_for(target), source_client=ctx.client,
                              drop_volumes=drop_volumes, rebind_mounts=rebind_mounts, post_copy=post_copy)
    if ctx.as_json:
        _print_json({**_container_dict(moved.container), "downtime_s": moved.downtime, "steps_s": moved.steps})
    else:
        _print_containers(ctx, [moved.container])
        out.print(f"downtime {moved.downtime:.2f} s (" +
                  ", ".join(f"{k} {v:.2f} s" for k, v in moved.steps.items()) + ")")


def _read_key(path: Optional[str]) -> Optional[bytes]:
    return Path(path).read_bytes() if path else None


def _checkpoint_dict(cp: Checkpoint, *, size: bool = True) -> Dict[str, Any]:
    """A checkpoint for --json; ``size=False`` for one whose files are gone."""
    return {
        "container_id": cp.container_id,
        "container": cp.container_name,
        "name": cp.name,
        "created_at": cp.created_at.isoformat(),
        "hostname": cp.hostname,
        **({"size_bytes": cp.size} if size else {}),
        "path": str(cp.path),
    }


def _container_dict(c: Container) -> Dict[str, Any]:
    try:
        ip: Optional[str] = ready.ip_address(c)
    except DollyError:
        ip = None
    return {"id": c.id, "name": c.name, "hostname": c.attrs["Config"]["Hostname"], "ip": ip,
            "status": c.status, "ports": c.ports}


def _print_checkpoints(ctx: Context, cps: List[Checkpoint]) -> None:
    _print_rows(ctx, [_checkpoint_dict(cp) for cp in cps],
                ("container", "checkpoint", "created (UTC)", "size", "hostname"),
                lambda r: (r["container"], r["name"], r["created_at"][:19].replace("T", " "),
                           f"{r['size_bytes'] / 2**20:.1f} MiB", r["hostname"]))


def _print_containers(ctx: Context, containers: List[Container]) -> None:
    def cells(r: Dict[str, Any]) -> Tuple[str, ...]:
        ports = ", ".join(f"{b['HostIp']}:{b['HostPort']}->{p}"
                          for p, bs in (r["ports"] or {}).items() for b in (bs or []))
        return r["name"], r["hostname"], r["ip"] or "", ports

    _print_rows(ctx, [_container_dict(c) for c in containers], ("name", "hostname", "IP", "ports"), cells)


def _print_rows(ctx: Context, rows: List[Dict[str, Any]], columns: Tuple[str, ...],
                cells: Callable[[Dict[str, Any]], Tuple[str, ...]]) -> None:
    """JSON with --json, else a table of ``columns`` with one row of ``cells(row)`` each."""
    if ctx.as_json:
        _print_json(rows)
        return
    table = Table(box=None)
    for col in columns:
        table.add_column(col)
    for r in rows:
        table.add_row(*cells(r))
    out.print(table)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
