"""Contract tests for the content store: atomic verified writes, refs, gc with leases, crash safety, ENOSPC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from imgci.errors import BlobNotFoundError, DigestMismatchError, ImageNotFoundError, StorageFullError, StoreError
from imgci.oci import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Descriptor, Digest, Manifest
from imgci.store import Store

REPO = Path(__file__).resolve().parents[2]


def _image(store: Store, payload: bytes) -> Descriptor:
    """Store a tiny manifest → config + one layer; return the manifest descriptor."""
    layer = store.write_blob(payload)
    cfg = store.write_blob(b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}')
    m = Manifest.build(
        Descriptor(OCI_CONFIG, cfg.digest, cfg.size), [Descriptor(OCI_LAYER_GZIP, layer.digest, layer.size)]
    )
    md = store.write_blob(m.raw)
    return Descriptor(OCI_MANIFEST, md.digest, md.size)


def test_write_and_read_blob(tmp_path: Path) -> None:
    store = Store(tmp_path)
    d = store.write_blob(b"hello")
    assert d.digest == Digest.of(b"hello")
    assert store.read_blob(d.digest) == b"hello"
    assert store.blob_path(d.digest) == tmp_path / "blobs" / "sha256" / d.digest.hex
    assert (tmp_path / "oci-layout").read_text() == '{"imageLayoutVersion": "1.0.0"}'
    assert store.blob_size(d.digest) == 5


def test_wrong_digest_is_rejected_and_nothing_is_visible(tmp_path: Path) -> None:
    store = Store(tmp_path)
    wrong = Digest.of(b"something else")
    with pytest.raises(DigestMismatchError):
        store.write_blob(b"hello", expected=wrong)
    assert not store.has_blob(wrong)
    assert not store.has_blob(Digest.of(b"hello"))
    assert list(store.ingest_dir.iterdir()) == []


def test_streaming_writer_checks_size_and_digest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = os.urandom(100_000)
    expected = Digest.of(data)
    with store.blob_writer(expected, len(data)) as w:
        w.write(data[:50_000])
        w.write(data[50_000:])
        assert w.commit() == expected
    assert store.read_blob(expected) == data

    with pytest.raises(DigestMismatchError, match="size"), store.blob_writer(Digest.of(b"abc"), 3) as w:
        w.write(b"abcd")
    with pytest.raises(DigestMismatchError, match="size mismatch"), store.blob_writer(None, 10) as w:
        w.write(b"short")
        w.commit()
    assert list(store.ingest_dir.iterdir()) == []


def test_writer_aborted_by_exception_leaves_no_temp_file(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(RuntimeError), store.blob_writer() as w:
        w.write(b"partial")
        raise RuntimeError("network died")
    assert list(store.ingest_dir.iterdir()) == []
    assert list(store.iter_blobs()) == []


def test_refs(tmp_path: Path) -> None:
    store = Store(tmp_path)
    desc = _image(store, b"layer")
    with pytest.raises(BlobNotFoundError):
        store.set_ref("x:1", Descriptor(OCI_MANIFEST, Digest.of(b"missing"), 7))
    store.set_ref("docker.io/library/a:1", desc)
    store.set_ref("docker.io/library/b:1", desc)
    rec = store.get_ref("docker.io/library/a:1")
    assert rec.digest == desc.digest and rec.media_type == OCI_MANIFEST
    assert [r.name for r in store.list_refs()] == ["docker.io/library/a:1", "docker.io/library/b:1"]
    assert store.refs_for_digest(desc.digest) == ["docker.io/library/a:1", "docker.io/library/b:1"]
    store.delete_ref("docker.io/library/a:1")
    with pytest.raises(ImageNotFoundError):
        store.get_ref("docker.io/library/a:1")


def test_gc_keeps_what_refs_reach_and_removes_the_rest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    kept = _image(store, b"kept layer")
    dropped = _image(store, b"dropped layer")
    store.set_ref("keep:1", kept)
    store.release()  # as if this process ended: its lease no longer protects anything
    removed, freed = store.gc()
    assert removed == 2  # its manifest and layer (the config is shared with the kept image)
    assert freed > 0
    assert store.has_blob(kept.digest)
    assert not store.has_blob(dropped.digest)
    assert store.fsck() == []


def test_children_reads_a_layer_no_further_than_its_first_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc and push walk every image's blobs for the manifests among them: reading each layer whole to find it is
    not one was most of their time (a 200 MiB layer: 200 MiB read)."""
    store = Store(tmp_path)
    manifest = _image(store, b"\x1f\x8b" + os.urandom(1 << 20))  # gzip's magic, then anything
    parsed = Manifest.parse(store.read_blob(manifest.digest))
    layer = parsed.layers[0]
    read: list[int] = []
    real_open = store.open_blob

    class Counting:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

        def read(self, n: int = -1) -> bytes:
            data = self.f.read(n)
            read.append(len(data))
            return data

    monkeypatch.setattr(store, "open_blob", lambda d: Counting(real_open(d)))
    assert store.children(layer.digest) == []
    assert sum(read) <= 64
    read.clear()
    assert store.children(manifest.digest) == [parsed.config.digest, layer.digest]
    assert sum(read) >= manifest.size
    assert store.reachable({manifest.digest}) == {manifest.digest, parsed.config.digest, layer.digest}


def test_claim_all_protects_every_blob_or_none(tmp_path: Path) -> None:
    """A cache lookup claims a cached step's layers in one go: all present and then all kept by gc, or False
    with none of them leased."""
    writer = Store(tmp_path)
    a, b = writer.write_blob(b"layer a").digest, writer.write_blob(b"layer b").digest
    writer.release()  # as if the writing process ended
    store, collector = Store(tmp_path), Store(tmp_path)
    assert store.claim_all([a, Digest.of(b"not there")]) is False
    assert collector.gc()[0] == 2  # the failed claim leased nothing
    a, b = writer.write_blob(b"layer a").digest, writer.write_blob(b"layer b").digest
    writer.release()
    assert store.claim_all([a, b]) is True
    assert store.claim_all([]) is True
    assert collector.gc()[0] == 0  # kept by the claim
    store.release()
    assert collector.gc()[0] == 2


def test_gc_respects_another_live_process_lease(tmp_path: Path) -> None:
    """A blob another (live) process just wrote, before it sets a ref, survives a concurrent gc."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from imgci.store import Store
        s = Store({str(tmp_path)!r})
        d = s.write_blob(b"in flight")
        print(d.digest.value, flush=True)
        time.sleep(30)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        digest = Digest(proc.stdout.readline().strip())
        store = Store(tmp_path)
        assert store.gc() == (0, 0)
        assert store.has_blob(digest)
    finally:
        proc.kill()
        proc.wait()
    # The writer died without setting a ref: now its blob is garbage.
    store = Store(tmp_path)
    removed, _ = store.gc()
    assert removed == 1 and not store.has_blob(digest)


def test_kill_9_during_write_leaves_store_consistent(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from imgci.store import Store
        s = Store({str(tmp_path)!r})
        s.set_ref("done:1", __import__("imgci.oci", fromlist=["x"]).Descriptor(
            "application/vnd.oci.image.manifest.v1+json", s.write_blob(b"{{}}").digest, 2))
        w = s.blob_writer()
        print("writing", flush=True)
        while True:
            w.write(b"x" * 65536)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(tmp_path)
    assert store.fsck() == []
    assert [r.name for r in store.list_refs()] == ["done:1"]
    assert len(list(store.ingest_dir.iterdir())) == 1  # the dead writer's temp file, never visible as a blob
    store.gc()
    assert list(store.ingest_dir.iterdir()) == []
    assert store.has_blob(Digest.of(b"{}"))


def test_fsck_finds_corruption_and_missing_blobs(tmp_path: Path) -> None:
    store = Store(tmp_path)
    desc = _image(store, b"layer bytes")
    store.set_ref("x:1", desc)
    manifest = store.read_manifest(desc.digest)
    assert isinstance(manifest, Manifest)
    layer = manifest.layers[0].digest
    store.blob_path(layer).write_bytes(b"tampered")
    store.blob_path(manifest.config.digest).unlink()
    problems = store.fsck()
    assert any("corrupt" in p and layer.hex in p for p in problems)
    assert any("missing" in p and manifest.config.digest.hex in p for p in problems)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    import sqlite3

    Store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "index.db")
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(StoreError, match="newer imgci"):
        Store(tmp_path)


def test_concurrent_processes_share_a_state_dir(tmp_path: Path) -> None:
    """Two writers setting refs and a pruner running at the same time: every ref stays complete."""
    writer = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(REPO / "tests" / "unit")!r})
        from imgci.store import Store
        from test_store import _image
        s = Store({str(tmp_path)!r})
        for i in range(40):
            s.set_ref(f"w{{sys.argv[1]}}:{{i}}", _image(s, f"{{sys.argv[1]}}-{{i}}".encode()))
            if i % 2:
                s.delete_ref(f"w{{sys.argv[1]}}:{{i}}")
        """
    )
    pruner = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from imgci.store import Store
        s = Store({str(tmp_path)!r})
        for _ in range(15):
            s.gc()
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(n)]) for n in (1, 2)]
    procs.append(subprocess.Popen([sys.executable, "-c", pruner]))
    for p in procs:
        assert p.wait(timeout=120) == 0
    store = Store(tmp_path)
    assert len(store.list_refs()) == 40
    assert store.fsck() == []
    store.gc()
    assert store.fsck() == []
    assert len(list(store.iter_blobs())) == 40 * 2 + 1  # manifest + layer per kept ref, one shared config


def test_disk_full_is_a_clear_error_and_the_store_stays_intact(tmp_path: Path) -> None:
    """A real ENOSPC on a 1 MiB tmpfs (mounted in a private user+mount namespace)."""
    state = tmp_path / "state"
    state.mkdir()
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from imgci.errors import StorageFullError
        from imgci.store import Store
        s = Store({str(state)!r})
        small = s.write_blob(b"fits")
        s.set_ref("small:1", __import__("imgci.oci", fromlist=["x"]).Descriptor("x", small.digest, 4))
        try:
            s.write_blob(os.urandom(4 << 20))
        except StorageFullError as e:
            print("FULL:", e)
        assert os.listdir(s.ingest_dir) == [], os.listdir(s.ingest_dir)
        assert s.fsck() == [], s.fsck()
        assert s.read_blob(small.digest) == b"fits"
        print("INTACT")
        """
    )
    cmd = [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        f'mount -t tmpfs -o size=1m none "{state}" && exec "{sys.executable}" -c "$0"',
        script,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "FULL: no space left" in out.stdout
    assert "INTACT" in out.stdout
    assert StorageFullError.__mro__[1] is StoreError
