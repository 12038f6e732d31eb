"""Checkpoints in an S3-compatible object store: a real SeaweedFS server on 127.0.0.1 (the
`s3` fixture in conftest.py), spoken to through pyarrow as Ray does. The killed, interrupted
and resumed run on the store is test_fault_tolerance.py's; here, what is refused before any
work."""
import subprocess
import sys

import pytest

from conftest import S3_KEY as KEY, S3_SECRET as SECRET

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a real SeaweedFS server and CLI runs


def test_credentials_in_the_storage_uri_are_refused_in_one_line_that_never_shows_them(s3, tmp_path):
    """pyarrow accepts s3://KEY:SECRET@bucket (this server lets that URI in), but the storage
    path is copied into summary.json, the console and Ray Train's state export: the CLI refuses
    it before any work (no Ray, no data, nothing written), in one line that points to the
    nodes' environment and never repeats the secret."""
    import pyarrow.fs

    uri, fs, env = s3
    with_credentials = uri.replace("s3://", f"s3://{KEY}:{SECRET}@", 1)
    store, path = pyarrow.fs.FileSystem.from_uri(with_credentials)
    assert store.get_file_info(path.split("/")[0]).type == pyarrow.fs.FileType.Directory  # a working URI
    env = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS")}
    for extra in ([], ["--print-config"]):
        proc = subprocess.run([sys.executable, "-m", "ray_fedat.train", "--dataset", "digits", "--workers", "2",
                               "--rounds", "1", "--storage-path", with_credentials, "--name", "creds",
                               "--output-dir", str(tmp_path / "out"), "--final-attack", "none", *extra],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert lines[0].startswith("ray_fedat: error: --storage-path s3://***@rayfedat/runs: credentials in a "
                                   "storage URI are refused") and "AWS_SECRET_ACCESS_KEY" in lines[0], lines[0]
        assert SECRET not in proc.stdout + proc.stderr and proc.stdout == ""
        assert not any(tmp_path.iterdir())  # no run directory, no Ray session files
    assert fs.get_file_info("rayfedat/runs/creds").type == pyarrow.fs.FileType.NotFound  # nothing in the store
