"""The shared data root as a Prefect block: a local directory, or an S3-compatible bucket such as a
RunPod network volume's S3 endpoint (bucket = the volume id, so `s3://VOLUME/ft-data` from the
workstation is `/workspace/ft-data` inside a pod that mounts the volume).

The block turns into what `floorplan_ft.store.ArtifactStore` needs: a data-root string (a path or
an fsspec URL) and, for S3, fsspec storage options. `configure_fsspec()` installs those options as
fsspec's process-wide defaults for the `s3` protocol, so every `ArtifactStore("s3://...")` in the
process (including those built inside tasks from a plain root string) authenticates without the
store having to carry credentials around.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, model_validator

from floorplan_ft.redact import mask_url

DATA_ROOT_BLOCK = "data-root"


class DataRootStorage(Block):
    """Where ft-pipeline keeps every artifact: a local path or an S3-compatible bucket + prefix."""

    _block_type_name: ClassVar[str] = "ft-pipeline Data Root"
    _block_type_slug: ClassVar[str] = "ft-data-root-storage"
    _description: ClassVar[str] = (
        "ft-pipeline's shared data root: a local directory or an S3-compatible bucket "
        "(e.g. a RunPod network volume's S3 API), with its credentials."
    )

    kind: Literal["local", "s3"] = Field("local", description="'local' directory or 's3' bucket.")
    path: str | None = Field(None, description="Local directory (kind 'local').")
    endpoint_url: str | None = Field(
        None,
        description="S3 endpoint, e.g. https://s3api-eur-is-1.runpod.io (empty: AWS S3).",
    )
    bucket: str | None = Field(None, description="Bucket (a RunPod network volume id).")
    prefix: str = Field("", description="Key prefix inside the bucket, e.g. 'ft-data'.")
    region: str | None = Field(None, description="Region name (RunPod: the datacenter, e.g. EUR-IS-1).")
    access_key_id: SecretStr | None = Field(None, description="S3 access key id.")
    secret_access_key: SecretStr | None = Field(None, description="S3 secret access key.")

    @model_validator(mode="after")
    def _check_kind(self) -> DataRootStorage:
        if self.kind == "local" and not self.path:
            raise ValueError("a 'local' data root needs a path")
        if self.kind == "s3" and not self.bucket:
            raise ValueError("an 's3' data root needs a bucket")
        return self

    @classmethod
    def from_data_root(cls, data_root: str, **s3: Any) -> DataRootStorage:
        """Build from a data-root string ('/mnt/data' or 's3://bucket/prefix') plus S3 fields."""
        if data_root.startswith("s3://"):
            parts = urlsplit(data_root)
            return cls(kind="s3", bucket=parts.netloc, prefix=parts.path.strip("/"), **s3)
        return cls(kind="local", path=data_root)

    def data_root(self) -> str:
        """The value for `paths.data_root`."""
        if self.kind == "local":
            return str(self.path)
        prefix = self.prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs keyword arguments (contains the secrets: never log or return from a task)."""
        if self.kind == "local":
            return {}
        options: dict[str, Any] = {}
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        if self.access_key_id is not None:
            options["key"] = self.access_key_id.get_secret_value()
        if self.secret_access_key is not None:
            options["secret"] = self.secret_access_key.get_secret_value()
        if self.region:
            options["client_kwargs"] = {"region_name": self.region}
        return options

    def configure_fsspec(self) -> None:
        """Make these options fsspec's defaults for s3:// in this process (no-op for 'local')."""
        options = self.storage_options()
        if not options:
            return
        import fsspec.config

        fsspec.config.conf.setdefault("s3", {}).update(options)

    def describe(self) -> str:
        """A one-line description without secrets."""
        if self.kind == "local":
            return f"local {self.path}"
        creds = "with key" if self.access_key_id is not None else "no key"
        return f"s3 {self.data_root()} at {mask_url(self.endpoint_url) if self.endpoint_url else 'AWS'} ({creds})"
