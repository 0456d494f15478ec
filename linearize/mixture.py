"""The general text mixture: replay text for healing and the "general" evaluation text.

A model calibrated and healed on one text forgets what that text never shows (METHODS.md,
"Replay in healing"). The mixture is general text of five kinds, built from packages that
install from Debian and PyPI, the same way every time:

- encyclopaedic prose: entries of FOLDOC, the Free On-line Dictionary of Computing (dict-foldoc);
- technical documentation: Python's tutorial, HOWTOs, language reference (python3.11-doc);
- source code: SymPy's core and number theory modules (the sympy wheel, a torch dependency);
- dialogue and questions and answers: Python's FAQ and fortune files (fortunes);
- numbers and math: the Python library pages on numbers, decimal, fractions, statistics.

It shares no source with the texts that the project evaluates on: the evaluation half of the
calibration text is never in it, nor the Debian licence texts, the Python standard library's
source or git's release notes (bench/healbench.py's out-of-domain texts); no library page of a
module in that source is taken either.

Documents are read in a fixed order; every HELD_OUT_EVERY-th document of each kind goes to the
held-out part (the "general" evaluation text), the rest to the healing part. Each part
interleaves its kinds chunk by chunk, so that any prefix of it (what healing and evaluation read)
holds every kind. `python -m linearize.mixture build` (run by `make setup`) fetches the Debian
packages with `apt-get download` (no root needed), extracts them under the cache dir, writes
heal.txt, heldout.txt and manifest.json there, and says whether the texts match the committed
manifest (MANIFEST_PATH: sources, versions, licences, sizes, sha256).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from linearize.errors import DataError

log = logging.getLogger(__name__)

MANIFEST_PATH = Path(__file__).with_name("mixture_manifest.json")
PARTS = ("heal", "heldout")
HELD_OUT_EVERY = 8  # every 8th document of a kind is held out for evaluation
CHUNK_CHARS = 2000  # the interleaving unit: about 500 tokens, one healing window
KIND_CHARS = 640_000  # per kind; five kinds make ~3.2 MB


@dataclass(frozen=True)
class Kind:
    name: str
    package: str  # Debian package, or "pypi:<name>"
    licence: str
    paths: tuple[str, ...]  # globs under the extracted package root (or the installed package)
    split: str  # how a file divides into documents: "file", "fortune" or "foldoc"


KINDS = (
    Kind(
        "encyclopaedic",
        "dict-foldoc",
        "GFDL-1.1+ (FOLDOC)",
        ("usr/share/dictd/foldoc.dict.dz",),
        "foldoc",
    ),
    Kind(
        "technical",
        "python3.11-doc",
        "PSF-2.0 (Python documentation)",
        tuple(
            f"usr/share/doc/python3.11/html/_sources/{d}/*.rst.txt"
            for d in ("tutorial", "howto", "reference", "using")
        ),
        "file",
    ),
    Kind(
        "code",
        "pypi:sympy",
        "BSD-3-Clause (SymPy)",
        ("core/*.py", "ntheory/*.py", "sets/*.py"),
        "file",
    ),
    Kind(
        "dialogue",
        "fortunes",
        "BSD-4-Clause (fortune-mod) / PSF-2.0 (Python FAQ)",
        (
            "usr/share/games/fortunes/startrek",
            "usr/share/games/fortunes/humorists",
            "usr/share/games/fortunes/people",
            "usr/share/games/fortunes/wisdom",
            "usr/share/games/fortunes/science",
            "python3.11-doc:usr/share/doc/python3.11/html/_sources/faq/*.rst.txt",
        ),
        "fortune",
    ),
    Kind(
        "math",
        "python3.11-doc",
        "PSF-2.0 (Python documentation)",
        tuple(
            f"usr/share/doc/python3.11/html/_sources/library/{m}.rst.txt"
            for m in ("math", "cmath", "decimal", "fractions", "numbers", "statistics", "random")
        )
        + ("usr/share/doc/python3.11/html/_sources/tutorial/floatingpoint.rst.txt",),
        "file",
    ),
)


def mixture_dir() -> Path:
    from linearize.cache import cache_dir

    return cache_dir() / "mixture"


def part_path(part: str) -> Path:
    """The built text of one part; a clear error when the mixture was never built."""
    if part not in PARTS:
        raise DataError(f"the mixture has parts {PARTS}, not {part!r}")
    path = mixture_dir() / f"{part}.txt"
    if not path.is_file():
        raise DataError(
            f"the general text mixture is not built ({path} is missing): run "
            "`python -m linearize.mixture build` (make setup does)"
        )
    return path


def is_built() -> bool:
    return all((mixture_dir() / f"{part}.txt").is_file() for part in PARTS)


# --- reading the sources ----------------------------------------------------------------------


def documents(kind: Kind, roots: dict[str, Path]) -> list[str]:
    """The kind's documents in a fixed order (sorted paths, file order within a file)."""
    docs = []
    for pattern in kind.paths:
        package, _, glob = pattern.rpartition(":")
        root = roots[package or kind.package]
        files = sorted(root.glob(glob))
        if not files:
            raise DataError(f"mixture source {kind.name}: nothing matches {root / glob}")
        for path in files:
            docs += split_documents(read_source(path), kind.split if not package else "file")
    return [d for d in docs if d.strip()]


def read_source(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".dz":  # dictzip is gzip with a seek table
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n")


def split_documents(text: str, how: str) -> list[str]:
    if how == "fortune":  # entries separated by lines holding "%"
        return [entry.strip() + "\n" for entry in text.split("\n%\n")]
    if how == "foldoc":  # a headword starts at column 0, its entry is indented
        entries, current = [], []
        for line in text.splitlines():
            if line and not line[0].isspace() and current and current[-1] == "":
                entries.append("\n".join(current).strip() + "\n")
                current = []
            current.append(line)
        entries.append("\n".join(current).strip() + "\n")
        return [e for e in entries if not e.startswith("00-database")]  # the dictionary's header
    return [text]


def take(docs: list[str], budget: int) -> list[str]:
    """Documents spread evenly over the list (a stride), up to `budget` characters, in order."""
    total = sum(len(d) for d in docs)
    stride = max(1, total // budget)
    taken, size = [], 0
    for doc in docs[::stride]:
        if size >= budget:
            break
        taken.append(doc[: budget - size])
        size += len(taken[-1])
    return taken


def chunks(docs: list[str], size: int = CHUNK_CHARS) -> list[str]:
    text = "\n".join(docs)
    return [text[i : i + size] for i in range(0, len(text), size)]


def interleave(per_kind: list[list[str]]) -> str:
    """Chunk i of every kind, then chunk i+1...: any prefix holds every kind."""
    out = []
    for i in range(max(map(len, per_kind))):
        out += [kind[i] for kind in per_kind if i < len(kind)]
    return "".join(out)


def assemble(roots: dict[str, Path], kinds=KINDS, kind_chars: int = KIND_CHARS) -> dict:
    """{part: text} and each kind's sizes, from extracted package roots."""
    heal, heldout, sizes = [], [], {}
    for kind in kinds:
        docs = take(documents(kind, roots), kind_chars)
        held = docs[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]
        kept = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
        heal.append(chunks(kept))
        heldout.append(chunks(held))
        sizes[kind.name] = {
            "documents": len(docs),
            "heal_chars": sum(map(len, kept)),
            "heldout_chars": sum(map(len, held)),
        }
    return {"heal": interleave(heal), "heldout": interleave(heldout), "kinds": sizes}


# --- fetching the packages --------------------------------------------------------------------


def fetch_debian(packages: list[str], target: Path) -> dict[str, dict]:
    """apt-get download each package (once) and extract it under target/<package>."""
    debs = target / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    info = {}
    for package in packages:
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            subprocess.run(["apt-get", "download", package], cwd=debs, check=True)
            found = sorted(debs.glob(f"{package}_*.deb"))
        deb = found[-1]
        root = target / "extracted" / package
        if not root.is_dir():  # extracted whole or not at all
            partial = root.with_name(root.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True)
            partial.rename(root)
        version = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
        ).stdout.strip()
        info[package] = {"version": version, "deb_sha256": sha256_file(deb), "root": root}
    return info


def pypi_root(name: str) -> tuple[Path, str]:
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise DataError(f"mixture source: the PyPI package {name} is not installed")
    return Path(spec.origin).parent, importlib.metadata.version(name)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build(target: Path | None = None) -> dict:
    """Fetch, assemble and write the mixture; returns its manifest."""
    target = target or mixture_dir()
    debian = sorted(
        {k.package for k in KINDS if not k.package.startswith("pypi:")}
        | {path.split(":")[0] for k in KINDS for path in k.paths if ":" in path}
    )
    fetched = fetch_debian(debian, target)
    roots = {name: info["root"] for name, info in fetched.items()}
    versions = {name: info["version"] for name, info in fetched.items()}
    for kind in KINDS:
        if kind.package.startswith("pypi:"):
            roots[kind.package], versions[kind.package] = pypi_root(kind.package[5:])
    built = assemble(roots)
    files = {}
    for part in PARTS:
        path = target / f"{part}.txt"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(built[part], encoding="utf-8")
        tmp.replace(path)
        files[part] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {
        "kinds": [
            {
                "name": k.name,
                "package": k.package,
                "version": versions[k.package],
                "licence": k.licence,
                "paths": list(k.paths),
                **built["kinds"][k.name],
            }
            for k in KINDS
        ],
        "packages": {
            name: {"version": info["version"], "deb_sha256": info["deb_sha256"]}
            for name, info in fetched.items()
        },
        "files": files,
        "held_out_every": HELD_OUT_EVERY,
        "chunk_chars": CHUNK_CHARS,
    }
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def differences(built: dict, committed: dict) -> list[str]:
    """What differs between a built manifest and the committed one (empty: the same texts)."""
    out = []
    for part in PARTS:
        if built["files"][part]["sha256"] != committed["files"][part]["sha256"]:
            out.append(f"{part}.txt differs from the committed manifest's sha256")
    for name, info in built["packages"].items():
        had = committed["packages"].get(name, {}).get("version")
        if had != info["version"]:
            out.append(f"{name} {info['version']} (the manifest has {had})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linearize.mixture", description=__doc__)
    parser.add_argument("command", choices=["build"])
    parser.add_argument(
        "--write-manifest", action="store_true", help="replace the committed manifest"
    )
    args = parser.parse_args(argv)
    manifest = build()
    if args.write_manifest:
        MANIFEST_PATH.write_text(json.dumps(manifest, indent=2) + "\n")
    changed = differences(manifest, json.loads(MANIFEST_PATH.read_text()))
    for line in changed:
        print(f"warning: {line}", file=sys.stderr)
    sizes = ", ".join(f"{p} {manifest['files'][p]['bytes'] / 1e6:.2f} MB" for p in PARTS)
    print(f"mixture built in {mixture_dir()}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
