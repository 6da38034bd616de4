"""Hugging Face Hub model ids (`Qwen/Qwen3-1.7B-Base`, optionally `@revision`) wherever a checkpoint is
named, through `huggingface_hub`'s own cache: the first use downloads the checkpoint's config, tokenizer
and safetensors files into it (HF_HOME / HF_HUB_CACHE), later uses and HF_HUB_OFFLINE=1 read it from there.
GGUF repositories are not resolved (name the downloaded .gguf file instead)."""

from __future__ import annotations

import re
from pathlib import Path

from rlp_jax.fetch.errors import FetchError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")   # owner/name[@revision]
CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


def is_hub_id(name) -> bool:
    """`name` has the shape of a Hub model id and is not a local path."""
    return isinstance(name, str) and bool(HUB_ID.match(name)) and not Path(name).exists()


def snapshot(name: str) -> Path:
    """The local folder of Hub model `name` (owner/name[@revision]) in huggingface_hub's cache, downloaded on
    first use. FetchError (one line) when it is neither cached nor downloadable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo, _, revision = name.partition("@")
    try:
        path = Path(snapshot_download(repo, revision=revision or None, allow_patterns=CHECKPOINT_FILES))
    except RepositoryNotFoundError:
        raise FetchError(f"{name} is neither a local path nor a model on the Hugging Face Hub (or it is private: "
                         "huggingface-cli login)") from None
    except LocalEntryNotFoundError:
        raise FetchError(f"{name} is neither a local path nor in the Hugging Face cache, and the Hub cannot be "
                         "reached (offline or HF_HUB_OFFLINE=1); download it where there is network "
                         f"(huggingface-cli download {repo}) or pass a local checkpoint directory") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise FetchError(f"could not get {name} from the Hugging Face Hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); pass a local checkpoint directory") from None
    if not (path / "config.json").is_file():
        raise FetchError(f"{name} on the Hugging Face Hub has no config.json: not a transformers checkpoint "
                         "(for a GGUF repository, download the .gguf file and name it)")
    return path
