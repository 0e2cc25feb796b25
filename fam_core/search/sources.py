"""Where an indexed image is read from: its URI.

A file image's URI is its absolute path; a Parquet image set's row is
``parquet:///abs/set.parquet#ID`` (the file and the row's ``id``).

Example:
    >>> parquet_uri("/data/set.parquet", "a/1")
    'parquet:///data/set.parquet#a/1'
    >>> read_uri("/no/such/image.png")
    Traceback (most recent call last):
    ...
    ValueError: /no/such/image.png: no such file
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

PARQUET_SCHEME = "parquet://"
_PARQUET_END = ".parquet#"


def parquet_uri(file: str | Path, image_id: str) -> str:
    """The URI of row ``image_id`` of Parquet file ``file``."""
    return f"{PARQUET_SCHEME}{Path(file).resolve().as_posix()}#{image_id}"


def read_uri(uri: str) -> bytes:
    """The encoded bytes of the image at ``uri``: a path, ``file://`` or ``parquet://`` URI;
    ``ValueError`` naming the URI and the reason when it cannot be read."""
    if uri.startswith(PARQUET_SCHEME):
        return _read_parquet_row(uri)
    path = Path(unquote(urlparse(uri).path)) if uri.startswith("file://") else Path(uri)
    if not uri or not path.is_file():
        raise ValueError(f"{uri}: no such file")
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"{uri}: {error.strerror or error}") from None


def _read_parquet_row(uri: str) -> bytes:
    file, found, image_id = uri.removeprefix(PARQUET_SCHEME).partition(_PARQUET_END)
    file += ".parquet"
    if not found or not Path(file).is_file():
        raise ValueError(f"{uri}: no such Parquet file")
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(file, columns=["id", "image"], filters=pc.field("id") == image_id)
    if table.num_rows == 0:
        raise ValueError(f"{uri}: no row with this id")
    return bytes(table.column("image")[0].as_py())
