"""Model resolution and the converted-weights store.

`model` in config is a Hugging Face model directory, a `.gguf` file, or `bundled:NAME`. GGUF
files are dequantized by transformers, which takes tens of seconds; the result (safetensors +
tokenizer + config) is kept under `store_dir/<sha256 prefix of the file>/` so later starts load
in about a second. A conversion writes to a temporary directory and renames it into place, so an
interrupted one never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from backends.bundled import resolve_model_path

log = logging.getLogger(__name__)

_HASH_CHUNK = 8 << 20
_DONE_MARKER = "aibox-store.json"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_model_dir(ref: str, store_dir: str | Path) -> Path:
    """A directory `from_pretrained` can load: the HF dir itself, or the store entry of a GGUF."""
    path = resolve_model_path(ref)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"model must be a Hugging Face directory or a .gguf file, got {path}")
    entry = Path(store_dir).expanduser() / file_sha256(path)[:32]
    if (entry / _DONE_MARKER).exists():
        return entry
    convert_gguf(path, entry)
    return entry


def convert_gguf(gguf_path: Path, entry: Path) -> None:
    """Dequantize a GGUF through transformers and save it as safetensors + tokenizer at `entry`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into the model store at %s (first use only)", gguf_path, entry)
    steps = ["tokenizer", "weights (dequantize)", "save"]
    with tqdm(total=len(steps), desc=f"converting {gguf_path.name}", unit="step") as bar:
        bar.set_postfix_str(steps[0])
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        bar.update()
        bar.set_postfix_str(steps[1])
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32")
        bar.update()
        bar.set_postfix_str(steps[2])
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
        try:
            _save_dequantized(model, tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _DONE_MARKER).write_text(f'{{"source": "{gguf_path.name}"}}\n')
            try:
                tmp.rename(entry)
            except OSError:  # another process converted the same file meanwhile: keep theirs
                if not (entry / _DONE_MARKER).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        bar.update()


def _save_dequantized(model: Any, out_dir: Path) -> None:
    """Write config + safetensors of a GGUF-loaded model (its `save_pretrained` refuses: the GGUF
    quantizer marks it unserializable, although the weights are already plain dequantized floats)."""
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    save_model(model, str(out_dir / "model.safetensors"), metadata={"format": "pt"})  # dedupes tied weights


def load_model(model_dir: Path, dtype: str) -> tuple[Any, Any]:
    """(Gemma3ForCausalLM on CPU, tokenizer) from a model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    return model.eval(), tokenizer
