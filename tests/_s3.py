"""An S3 API EMULATOR for tests (moto's ``ThreadedMotoServer`` on 127.0.0.1 — not AWS S3: no
real object store can run here, DESIGN §12): :func:`s3_emulator` starts one with an empty
bucket, credentials only through the standard AWS environment variables (as in production), and
skips the test (saying why) where moto cannot start.

Example::

    with s3_emulator(monkeypatch) as emu:
        cfg = SidecarConfig.from_dict({"data_dir": str(tmp), "store": store_config(emu)})
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.conftest import free_port

__all__ = ["S3Emulator", "s3_emulator", "store_config"]


@dataclasses.dataclass
class S3Emulator:
    """A moto S3 API emulator on 127.0.0.1:``port`` holding ``bucket`` (restartable: its
    objects live in this process's moto backend, not in the server thread)."""

    port: int
    bucket: str
    server: Any

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def fs(self) -> Any:
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http",
                                 region="us-east-1", allow_bucket_creation=True)

    def keys(self, prefix: str = "") -> list[str]:
        import pyarrow.fs as pafs

        infos = self.fs().get_file_info(pafs.FileSelector(f"{self.bucket}/{prefix}".rstrip("/"),
                                                          recursive=True, allow_not_found=True))
        return sorted(i.path[len(self.bucket) + 1:] for i in infos
                      if i.type == pafs.FileType.File)


@contextlib.contextmanager
def s3_emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Emulator]:
    """An S3 API emulator (moto) with an empty bucket; credentials only through the standard
    AWS environment variables, as in production. Skipped (with the reason) if moto cannot
    start here."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:   # the dev extra is not installed
        pytest.skip(f"S3 API emulator unavailable: moto[server] is not installed ({e})")
    for var, value in (("AWS_ACCESS_KEY_ID", "emulator-key"),
                       ("AWS_SECRET_ACCESS_KEY", "emulator-secret"),
                       ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(var, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    try:
        server.start()
    except Exception as e:   # e.g. the port was taken meanwhile, werkzeug missing
        pytest.skip(f"S3 API emulator (moto) could not start: {e}")
    emu = S3Emulator(port=port, bucket=f"forensics-{uuid.uuid4().hex[:12]}", server=server)
    try:
        emu.fs().create_dir(emu.bucket)
        yield emu
    finally:
        emu.stop()


def store_config(emu: S3Emulator, prefix: str = "fleet/a") -> dict[str, Any]:
    """The ``store:`` section of a sidecar whose files live in ``emu``'s bucket."""
    return {"uri": f"s3://{emu.bucket}/{prefix}",
            "s3": {"endpoint_override": emu.endpoint, "scheme": "http", "region": "us-east-1"}}
