"""Where the archive's files live: a directory, or an S3-compatible bucket.

    <root>/day=YYYY-MM-DD/<name>.parquet   records settled that UTC day
    <root>/forgotten/<name>.parquet         users deleted (schema.FORGOTTEN)

The archiver names a file after the first stream entry it holds (relay.archive.archiver),
so that writing the same entries again replaces it rather than adds a copy.

`RELAY_ARCHIVE_URL` (`s3://bucket/prefix`, credentials and endpoint from the usual AWS_*
variables or the URL's query: `?endpoint_override=host:port&scheme=http`) puts every
host's files in one bucket, searchable from any host; otherwise `RELAY_ARCHIVE_DIR`, by
default `<state_dir>/archive`. A file appears whole or not at all: a local file is
written under a temporary name and renamed; an object store publishes an object when its
upload completes. Retention drops whole days.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from relay.archive.schema import FORGOTTEN, SCHEMA, day_of
from relay.settings import Settings

DAY_PREFIX = "day="
FORGOTTEN_DIR = "forgotten"
DAY_MS = 86_400_000
ROW_GROUP = (
    8 * 1024
)  # rows: a hit decompresses its row group whole, so small ones keep a lookup cheap
_OPTIONS: dict[str, object] = {
    "compression": "zstd", "use_dictionary": True, "write_statistics": True,
}  # fmt: skip


@dataclass(frozen=True)
class Store:
    """The archive's files on one filesystem under one root (no trailing slash)."""

    fs: pafs.FileSystem
    root: str

    @property
    def local(self) -> bool:
        """Whether the files are on this host's disk (so an engine may read them itself)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def write(self, table: pa.Table, writer: str, name: str | None = None) -> list[str]:
        """Write records (schema.SCHEMA), one file per UTC day they were settled on;
        returns the paths written. Given a `name`, each day's file is `<name>.parquet`,
        and writing the same name again replaces that file whole."""
        if table.num_rows == 0:
            return []
        # The UTC day of each row, as days since the epoch (settlement times are positive).
        days = pc.divide(pc.cast(table["settled_at"], pa.int64()), DAY_MS)
        distinct = sorted(pc.unique(days).to_pylist())
        written = []
        for number in distinct:
            part = table.filter(pc.equal(days, number)) if len(distinct) > 1 else table
            day = day_of(number * DAY_MS / 1000)
            path = f"{self.root}/{DAY_PREFIX}{day}/{self._file_name(writer, name)}"
            self._write(part, path, SCHEMA)
            written.append(path)
        return written

    def forget(self, table: pa.Table, writer: str, name: str | None = None) -> str:
        """Record users deleted (schema.FORGOTTEN rows); returns the path written (given
        a `name`, as `write`)."""
        path = f"{self.root}/{FORGOTTEN_DIR}/{self._file_name(writer, name)}"
        self._write(table, path, FORGOTTEN)
        return path

    def write_day(self, day: str, parts: Iterable[pa.Table], writer: str) -> str:
        """Write one new file of day `day` (`YYYY-MM-DD`) holding `parts` (schema.SCHEMA),
        each its own row group, in order, holding no more than one part in memory;
        returns its path. The file appears whole or not at all, as `write`'s."""
        path = f"{self.root}/{DAY_PREFIX}{day}/{self._file_name(writer, None)}"
        target = self._target(path)
        try:
            with pq.ParquetWriter(target, SCHEMA, filesystem=self.fs, **_OPTIONS) as out:
                for part in parts:
                    out.write_table(part.cast(SCHEMA), row_group_size=ROW_GROUP)
        except BaseException:
            # A bucket publishes what was closed, a valid file of some of the rows: they
            # are also in the files that were to be merged, which stay.
            if self.local:
                self.fs.delete_file(target)
            raise
        if self.local:
            self.fs.move(target, path)
        return path

    def replace(self, path: str, table: pa.Table) -> None:
        """Write `table` (schema.SCHEMA) over the data file at `path`, whole, or remove the
        file when the table is empty (a compaction)."""
        if table.num_rows == 0:
            self.fs.delete_file(path)
        else:
            self._write(table, path, SCHEMA)

    @staticmethod
    def _file_name(writer: str, name: str | None) -> str:
        return f"{name}.parquet" if name else f"{writer}-{uuid.uuid4().hex[:12]}.parquet"

    def days(self) -> list[str]:
        """The days (`YYYY-MM-DD`) that have files, oldest first."""
        found = []
        for info in self._list(self.root):
            name = info.base_name
            if info.type == pafs.FileType.Directory and name.startswith(DAY_PREFIX):
                found.append(name[len(DAY_PREFIX) :])
        return sorted(found)

    def files(self, since: str | None = None, until: str | None = None) -> list[str]:
        """The data files of the days from `since` to `until` (inclusive, `YYYY-MM-DD`)."""
        out = []
        for day in self.days():
            if (since is None or day >= since) and (until is None or day <= until):
                out += [
                    info.path
                    for info in self._list(f"{self.root}/{DAY_PREFIX}{day}")
                    if info.base_name.endswith(".parquet")
                ]
        return out

    def forgotten(self) -> pa.Table:
        """Every user deleted so far (schema.FORGOTTEN)."""
        paths = [i.path for i in self._list(f"{self.root}/{FORGOTTEN_DIR}") if i.is_file]
        if not paths:
            return FORGOTTEN.empty_table()
        return pa.concat_tables(
            pq.read_table(p, filesystem=self.fs, schema=FORGOTTEN) for p in paths
        )

    def day_files(self, day: str) -> list[pafs.FileInfo]:
        """The data files of one day, with their size and time of writing."""
        return [
            info
            for info in self._list(f"{self.root}/{DAY_PREFIX}{day}")
            if info.is_file and info.base_name.endswith(".parquet")
        ]

    def remove(self, path: str) -> bool:
        """Delete one data file; whether it was there."""
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            return False
        return True

    def drop_day(self, day: str) -> None:
        """Remove one day's files (retention)."""
        self.fs.delete_dir(f"{self.root}/{DAY_PREFIX}{day}")

    def _list(self, path: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(path, allow_not_found=True)
        return list(self.fs.get_file_info(selector))

    def _write(self, table: pa.Table, path: str, schema: pa.Schema) -> None:
        target = self._target(path)
        pq.write_table(
            table.cast(schema), target, filesystem=self.fs, row_group_size=ROW_GROUP, **_OPTIONS
        )
        if self.local:
            self.fs.move(target, path)

    def _target(self, path: str) -> str:
        """Where to write the file of `path` (its folder made): a local file under a
        temporary name, to rename; an object where it goes (published whole on completion)."""
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        # Two writers of the same name (an archiver and the one that took over its entries)
        # never share a temporary file; the rename replaces whole.
        return f"{path}.{uuid.uuid4().hex[:8]}.tmp" if self.local else path


def open_store(settings: Settings) -> Store:
    """The store `settings` name: the bucket of `archive_url`, else `archive_dir`, else
    `<state_dir>/archive`."""
    if settings.archive_url:
        fs, root = pafs.FileSystem.from_uri(settings.archive_url)
        return Store(fs, root.rstrip("/"))
    folder = settings.archive_dir or settings.state_dir / "archive"
    return Store(pafs.LocalFileSystem(), str(Path(folder).resolve()))
