"""Read character vectors out of an installed R package's lazy-load data (``data/Rdata.rdb``).

Just enough of R's serialization format (XDR, versions 2 and 3) to read what data packages such
as ``janeaustenr`` store: character, logical, integer, double and raw vectors, lists, pairlists
(attributes) and symbols. No R needed. The lazy-load database is two files: ``Rdata.rdx``, a
gzip-compressed serialized list mapping each variable to ``c(offset, length)`` in ``Rdata.rdb``;
and ``Rdata.rdb``, where each object is a 4-byte big-endian size followed by its zlib-compressed
serialization (R's compression type 1; types 2 and 3, bzip2 and xz, carry a 5-byte header).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

# SEXP types (R internals) and the serializer's special codes.
NILSXP, SYMSXP, LISTSXP, CLOSXP, PROMSXP, LANGSXP, CHARSXP = 0, 1, 2, 3, 5, 6, 9
LGLSXP, INTSXP, REALSXP, STRSXP, DOTSXP, VECSXP, EXPRSXP, RAWSXP = 10, 13, 14, 16, 17, 19, 20, 24
REFSXP, NILVALUE_SXP = 255, 254
_ENV_CODES = {253, 252, 251, 250, 242, 241}  # global/unbound/missing/base-namespace/empty/base env
_NA_INTEGER = -(2**31)


class RDataError(ValueError):
    """The bytes are not an R serialization this reader understands."""


class RVector(list):
    """An R vector: a list of values plus its attributes (``names``, ``class``, ...)."""

    def __init__(self, values, rtype: int, attributes: dict[str, Any] | None = None):
        super().__init__(values)
        self.rtype = rtype
        self.attributes = attributes or {}

    @property
    def names(self) -> list[str] | None:
        names = self.attributes.get("names")
        return list(names) if names is not None else None

    def as_dict(self) -> dict[str, Any]:
        if self.names is None:
            raise RDataError("vector has no names")
        return dict(zip(self.names, self))


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def _int(self) -> int:
        if self.pos + 4 > len(self.data):
            raise RDataError("truncated R serialization")
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise RDataError("truncated R serialization")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def header(self) -> None:
        fmt = self._bytes(2)
        if fmt != b"X\n":
            raise RDataError(f"not an XDR R serialization (format {fmt!r})")
        version = self._int()
        self._int()  # R version that wrote it
        self._int()  # oldest R version that reads it
        if version == 3:
            self._bytes(self._int())  # native encoding name
        elif version != 2:
            raise RDataError(f"unsupported R serialization version {version}")

    def _pairlist_to_dict(self, node) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while node is not None:
            tag, value, node = node
            out[tag if isinstance(tag, str) else str(len(out))] = value
        return out

    def item(self) -> Any:
        flags = self._int()
        rtype = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if rtype == NILVALUE_SXP:
            return None
        if rtype in _ENV_CODES:
            return None
        if rtype == REFSXP:
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if rtype == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if rtype in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP):
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            return (tag, car, cdr)
        if rtype == CHARSXP:
            n = self._int()
            return None if n == -1 else self._bytes(n).decode("utf-8", "replace")
        if rtype in (LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP, RAWSXP):
            n = self._int()
            if n == -1:
                n = (self._int() << 32) + self._int()
            if rtype in (LGLSXP, INTSXP):
                values = list(struct.unpack_from(f">{n}i", self._bytes(4 * n)))
                values = [None if v == _NA_INTEGER else v for v in values]
                if rtype == LGLSXP:
                    values = [None if v is None else bool(v) for v in values]
            elif rtype == REALSXP:
                values = list(struct.unpack_from(f">{n}d", self._bytes(8 * n)))
            elif rtype == RAWSXP:
                values = list(self._bytes(n))
            else:
                values = [self.item() for _ in range(n)]
            attributes = self._pairlist_to_dict(self.item()) if has_attr else {}
            return RVector(values, rtype, attributes)
        raise RDataError(f"R object type {rtype} is not supported by this reader")


def unserialize(data: bytes) -> Any:
    """One R object from its (uncompressed) XDR serialization."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def _decompress_rdb_chunk(chunk: bytes) -> bytes:
    if len(chunk) < 5:
        raise RDataError("lazy-load entry too short")
    # Type 2/3 entries: 4-byte length, then b"2" (bzip2), b"3" (xz) or b"0" (stored).
    kind = chunk[4:5]
    if kind == b"2":
        return bz2.decompress(chunk[5:])
    if kind == b"3":
        return lzma.decompress(chunk[5:])
    if kind == b"0":
        return chunk[5:]
    return zlib.decompress(chunk[4:])


class LazyLoadDB:
    """A lazy-load database ``<stem>.rdx`` / ``<stem>.rdb`` (e.g. ``data/Rdata``)."""

    def __init__(self, stem: str | Path):
        stem = Path(stem)
        self.rdx = stem.with_suffix(".rdx")
        self.rdb = stem.with_suffix(".rdb")
        for path in (self.rdx, self.rdb):
            if not path.is_file():
                raise FileNotFoundError(path)
        index = unserialize(gzip.decompress(self.rdx.read_bytes()))
        if not isinstance(index, RVector):
            raise RDataError(f"{self.rdx} is not a lazy-load index")
        variables = index.as_dict().get("variables")
        if not isinstance(variables, RVector) or variables.names is None:
            raise RDataError(f"{self.rdx} has no variables")
        self.offsets = {name: (int(pos[0]), int(pos[1])) for name, pos in variables.as_dict().items()}

    @property
    def names(self) -> list[str]:
        return list(self.offsets)

    def __getitem__(self, name: str) -> Any:
        offset, length = self.offsets[name]
        with self.rdb.open("rb") as f:
            f.seek(offset)
            chunk = f.read(length)
        return unserialize(_decompress_rdb_chunk(chunk))
