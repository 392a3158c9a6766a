"""Hub repository ids and sharded weights for the standalone loader, on huggingface_hub and safetensors.

With diffusers installed, `sdvae_fast.AutoencoderKL.from_pretrained` is diffusers' own and does all this itself;
`sdvae_fast.loading.load_pretrained` (the standalone class's loader) uses these functions:

- `resolve_folder(name_or_path, subfolder=..., revision=..., cache_dir=..., local_files_only=..., token=...)`: a
  local folder as it is, or a Hub repository id ("org/name") through `huggingface_hub.snapshot_download`, which
  reads the local Hugging Face cache first (`HF_HOME` / `HF_HUB_CACHE`, or `cache_dir`) and downloads only what is
  missing, unless `local_files_only=True` or `HF_HUB_OFFLINE=1`. Only `config.json` and the
  `diffusion_pytorch_model*` files of the model's folder are fetched.
- `find_weights(folder, variant, use_safetensors)` and `read_weights(paths)`: the weights of a diffusers folder,
  one file or the shards listed by `diffusion_pytorch_model[.variant].safetensors.index.json`, as diffusers names
  them.
- `write_weights(state_dict, folder, variant, safe_serialization, max_shard_size, metadata)`: the same layout, split
  into shards (with the index file) by `huggingface_hub.split_torch_state_dict_into_shards` when the weights
  exceed `max_shard_size` (diffusers' default "10GB").

Every failure to find a model is an OSError with one line naming the repository or folder and what to do, as
diffusers raises it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch

WEIGHTS_STEM = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"
#: diffusers' default shard size for `save_pretrained`.
DEFAULT_MAX_SHARD_SIZE = "10GB"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _add_variant(name: str, variant: Optional[str]) -> str:
    """diffusers' file naming: the variant goes before the last extension ("a.safetensors" -> "a.fp16.safetensors",
    "a.safetensors.index.json" -> "a.safetensors.index.fp16.json")."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant, parts[-1]])


def resolve_folder(name_or_path: Union[str, os.PathLike], *, subfolder: Optional[str] = None,
                   revision: Optional[str] = None, cache_dir: Union[str, os.PathLike, None] = None,
                   local_files_only: bool = False, token: Union[str, bool, None] = None,
                   force_download: bool = False) -> Path:
    """The local folder holding a model's config.json and weights.

    Args:
        name_or_path: an existing local folder, or a Hub repository id "org/name".
        subfolder: the model's folder inside it, e.g. "vae" of a pipeline.
        revision, cache_dir, local_files_only, token, force_download: as for `huggingface_hub.snapshot_download`
            (Hub ids only); `local_files_only` is also on when the environment sets HF_HUB_OFFLINE=1.
    Returns:
        The folder (`name_or_path/subfolder`, or its snapshot in the Hugging Face cache).
    Raises:
        FileNotFoundError (an OSError): a path that is neither an existing folder nor a repository id.
        OSError: a missing subfolder, a repository or revision the Hub does not have, or, offline, one that is
            not in the cache (one line each).
    """
    path = Path(name_or_path)
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise OSError(f"{path}: no subfolder {subfolder!r}")
        return folder
    name = os.fspath(name_or_path)
    if not _REPO_ID.match(name):
        raise FileNotFoundError(f"{name}: no such folder, and not a Hub repository id of the form 'org/name'")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    offline = local_files_only or constants.HF_HUB_OFFLINE
    try:
        root = snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=offline,
                                 token=token, force_download=force_download,
                                 allow_patterns=[f"{prefix}{CONFIG_NAME}", f"{prefix}{WEIGHTS_STEM}*"])
    except LocalEntryNotFoundError:
        cache = cache_dir or constants.HF_HUB_CACHE
        how = "local_files_only=True" if local_files_only else (
            "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached")
        raise OSError(f"{name}: not in the Hugging Face cache ({cache}) and {how}; download it once with network "
                      f"access, or pass a local folder") from None
    except RevisionNotFoundError:
        raise OSError(f"{name}: the Hub has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise OSError(f"{name}: no such repository on the Hub (or it is private: pass token=)") from None
    except (EntryNotFoundError, HfHubHTTPError) as e:
        raise OSError(f"{name}: download failed ({str(e).splitlines()[0]})") from None
    folder = Path(root) / prefix if prefix else Path(root)
    if not (folder / CONFIG_NAME).is_file():
        raise OSError(f"{name}: no {prefix}{CONFIG_NAME} in the repository"
                      + ("" if subfolder else " (for a pipeline repository pass subfolder='vae')"))
    return folder


def find_weights(folder: Path, variant: Optional[str] = None, use_safetensors: Optional[bool] = None) -> list[Path]:
    """The weight files of a diffusers model folder, in load order: [the single file] or the index's shards.

    Preference as diffusers': safetensors over the `.bin` pickle (only safetensors when `use_safetensors=True`,
    only `.bin` when False), a single file over an index. Raises OSError naming the folder, the files looked for
    and the weight files present (e.g. only a variant: "pass variant='fp16'").
    """
    kinds = {True: [".safetensors"], False: [".bin"], None: [".safetensors", ".bin"]}[use_safetensors]
    wanted = []
    for ext in kinds:
        single = _add_variant(WEIGHTS_STEM + ext, variant)
        index = _add_variant(WEIGHTS_STEM + ext + ".index.json", variant)
        wanted += [single, index]
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            return _shards(folder / index)
    present = sorted(p.name for p in folder.iterdir() if p.name.startswith(WEIGHTS_STEM))
    hint = ""
    if present:
        variants = sorted({n.split(".")[1] for n in present
                           if n.count(".") >= 2 and n.split(".")[1] not in ("safetensors", "bin")})
        hint = f"; found {present}" + (f" (pass variant={variants[0]!r}?)" if variants and not variant else "")
    raise OSError(f"{folder}: no weights file {' or '.join(wanted)}{hint}")


def _shards(index: Path) -> list[Path]:
    """The shard files an index JSON maps weights to, in first-use order. Raises OSError for a broken index."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OSError(f"{index}: not a valid shard index ({e})") from None
    files = list(dict.fromkeys(weight_map.values()))
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise OSError(f"{index}: shard file(s) {missing} are missing")
    return [index.parent / f for f in files]


def write_weights(state_dict: dict[str, torch.Tensor], folder: Path, *, variant: Optional[str] = None,
                  safe_serialization: bool = True, max_shard_size: Union[int, str, None] = None,
                  metadata: Optional[dict[str, str]] = None) -> list[Path]:
    """Write a state dict (CPU, contiguous tensors) into `folder` in diffusers' layout; returns the files written.

    One `diffusion_pytorch_model[.variant].safetensors` (or `.bin` when `safe_serialization=False`), or shards of at
    most `max_shard_size` (bytes, or "10GB"-style strings; default diffusers' "10GB") named
    `diffusion_pytorch_model[.variant]-0000k-of-0000n.safetensors` plus the index JSON that maps each weight to its
    shard. `metadata` (str -> str) goes into every safetensors file. Stale weight files of the same name pattern
    are removed first, so a folder never holds two layouts at once.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    ext = ".safetensors" if safe_serialization else ".bin"
    name = _add_variant(WEIGHTS_STEM + ext, variant)
    index_name = _add_variant(WEIGHTS_STEM + ext + ".index.json", variant)
    pattern = name.replace(ext, "{suffix}" + ext)
    split = split_torch_state_dict_into_shards(state_dict, filename_pattern=pattern,
                                               max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    stem = name[: -len(ext)]
    for old in folder.glob(f"{stem}*{ext}*"):
        if old.name == name or old.name == index_name or re.fullmatch(re.escape(stem) + r"-\d{5}-of-\d{5}" +
                                                                     re.escape(ext), old.name):
            old.unlink()
    written = []
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: state_dict[k] for k in keys}
        target = folder / filename
        if safe_serialization:
            save_file(shard, str(target), metadata=metadata or {"format": "pt"})
        else:
            torch.save(shard, target)
        written.append(target)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(folder / index_name)
    return written
