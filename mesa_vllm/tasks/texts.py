"""Long natural text for perplexity: Jane Austen's six novels from the Debian package
``r-cran-janeaustenr``.

Source: ``r-cran-janeaustenr`` (Debian main since bullseye; Ubuntu universe), the CRAN package
``janeaustenr`` 1.0.0 by Julia Silge: "Full texts for Jane Austen's 6 completed novels, ready for
text analysis". Licence: the package is MIT (``/usr/share/doc/r-cran-janeaustenr/copyright``);
the novels themselves (1811-1818) are in the public domain, taken from Project Gutenberg
without its header and licence boilerplate. About 4.0 MB of text, roughly 0.95 M tokens with
SmolLM2's tokenizer; the shortest novel (Northanger Abbey) is about 100 k tokens, so every novel
holds a 64 k window.

The novels are stored as R lazy-load data; :mod:`mesa_vllm.tasks.rdata` reads them without R.
Where they are looked for, in order:

1. ``$MESA_AUSTEN_DIR`` (a ``janeaustenr`` folder, or a ``.deb`` file of the package);
2. R library folders: ``/usr/lib/R/site-library``, ``/usr/local/lib/R/site-library``,
   ``/usr/lib/R/library`` and ``$R_LIBS_SITE`` / ``$R_LIBS_USER`` / ``$R_LIBS`` (what
   ``apt-get install r-cran-janeaustenr`` gives; it pulls in R itself);
3. the mesa-vllm cache, ``$MESA_VLLM_CACHE/texts/janeaustenr`` (default
   ``~/.cache/mesa-vllm``), which :func:`prepare_austen` (``mesa-vllm prepare-text``) fills with
   ``apt-get download r-cran-janeaustenr`` and an unpack in Python: no root and no R needed.

Nothing here touches the network except :func:`prepare_austen`.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

from mesa_vllm.tasks.rdata import LazyLoadDB

DEBIAN_PACKAGE = "r-cran-janeaustenr"
R_PACKAGE = "janeaustenr"
LICENSE = "MIT (package); the novels are public domain"
# Variable names in the R package, in publication order, with titles.
NOVELS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
ENV_DIR = "MESA_AUSTEN_DIR"
INSTALL_HINT = (
    "Jane Austen's novels (perplexity text) come from the Debian package r-cran-janeaustenr. "
    "Get them with `mesa-vllm prepare-text` (runs `apt-get download r-cran-janeaustenr` and "
    "unpacks it into the mesa-vllm cache; no root, no R), or `apt-get install "
    "r-cran-janeaustenr`, or point $MESA_AUSTEN_DIR at the package's .deb file or its "
    "janeaustenr folder."
)


class TextSourceError(RuntimeError):
    """The perplexity text cannot be found; the message says how to get it."""


def _cache_dir() -> Path:
    from mesa_vllm.assets import cache_root

    return cache_root() / "texts" / R_PACKAGE


def candidate_dirs() -> list[Path]:
    """Where an unpacked ``janeaustenr`` folder is looked for, in order (see module docs)."""
    dirs: list[Path] = []
    env = os.environ.get(ENV_DIR)
    if env:
        dirs.append(Path(env).expanduser())
    libs = ["/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library"]
    for var in ("R_LIBS_SITE", "R_LIBS_USER", "R_LIBS"):
        libs += [p for p in os.environ.get(var, "").split(os.pathsep) if p]
    dirs += [Path(lib).expanduser() / R_PACKAGE for lib in libs]
    dirs.append(_cache_dir())
    return dirs


def _read_deb_member(deb: Path, prefix: str) -> dict[str, bytes]:
    """Files under ``prefix`` in a .deb's data archive (ar + tar, read with the stdlib)."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise TextSourceError(f"{deb} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            out = {}
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                for member in tar.getmembers():
                    path = member.name.lstrip("./")
                    if member.isfile() and path.startswith(prefix):
                        out[path[len(prefix):]] = tar.extractfile(member).read()
            return out
    raise TextSourceError(f"{deb} has no data.tar member")


def _unpack_deb(deb: Path, target: Path) -> Path:
    files = _read_deb_member(deb, f"usr/lib/R/site-library/{R_PACKAGE}/")
    if "data/Rdata.rdb" not in files:
        raise TextSourceError(f"{deb} does not contain {R_PACKAGE}/data/Rdata.rdb")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for rel, content in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def find_austen_dir() -> Path:
    """The ``janeaustenr`` folder to read, or :class:`TextSourceError` with the fix."""
    for path in candidate_dirs():
        if path.is_file() and path.suffix == ".deb":
            return _unpack_deb(path, _cache_dir())
        if (path / "data" / "Rdata.rdb").is_file():
            return path
    looked = "\n  ".join(str(p) for p in candidate_dirs())
    raise TextSourceError(f"{INSTALL_HINT}\nLooked in:\n  {looked}")


@lru_cache(maxsize=4)
def _load(folder: str) -> dict[str, str]:
    db = LazyLoadDB(Path(folder) / "data" / "Rdata")
    novels = {}
    for name in NOVELS:
        if name not in db.names:
            raise TextSourceError(f"{folder}: novel {name!r} missing (found {db.names})")
        lines = db[name]
        novels[name] = "\n".join(line or "" for line in lines).strip() + "\n"
    return novels


def austen_novels() -> dict[str, str]:
    """The six novels as plain text, keyed by the R package's variable names (see ``NOVELS``)."""
    return dict(_load(str(find_austen_dir())))


def prepare_austen(deb: str | os.PathLike | None = None, *, verbose: bool = True) -> Path:
    """Put the novels into the mesa-vllm cache: from ``deb`` if given, else ``apt-get download``.

    Returns the folder. Re-uses a folder that is already readable.
    """
    target = _cache_dir()
    if deb is None:
        try:
            found = find_austen_dir()
        except TextSourceError:
            found = None
        if found is not None:
            if verbose:
                print(f"Jane Austen novels already available: {found}")
            return found
        if shutil.which("apt-get") is None:
            raise TextSourceError(
                "apt-get is not available here. Download r-cran-janeaustenr's .deb from "
                "https://packages.debian.org/bookworm/all/r-cran-janeaustenr/download and run "
                "`mesa-vllm prepare-text --deb FILE`."
            )
        with tempfile.TemporaryDirectory() as tmp:
            if verbose:
                print(f"apt-get download {DEBIAN_PACKAGE} ...", flush=True)
            result = subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp,
                                    capture_output=True, text=True)
            debs = sorted(Path(tmp).glob(f"{DEBIAN_PACKAGE}_*.deb"))
            if result.returncode != 0 or not debs:
                raise TextSourceError(
                    f"`apt-get download {DEBIAN_PACKAGE}` failed ({result.returncode}): "
                    f"{result.stderr.strip()[-500:]}\n{INSTALL_HINT}"
                )
            folder = _unpack_deb(debs[-1], target)
    else:
        folder = _unpack_deb(Path(deb).expanduser(), target)
    _load.cache_clear()
    novels = _load(str(folder))
    if verbose:
        size = sum(len(t) for t in novels.values())
        print(f"Jane Austen novels ready: {folder} ({len(novels)} novels, {size:,} characters; "
              f"licence: {LICENSE})")
    return folder
