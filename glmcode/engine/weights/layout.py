"""The Hugging Face checkpoint layout glmcode reads and writes: its file names and its MTP block.

No torch here: the CLI's checkpoint checks use it too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from glmcode.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def is_mtp(name: str, num_layers: int) -> bool:
    """Whether a tensor belongs to the multi-token-prediction block, stored as layer `num_layers`
    (loaded only for speculative decoding)."""
    match = _LAYER_INDEX.match(name)
    return match is not None and int(match.group(1)) >= num_layers


def read_index(index_path: Path) -> dict:
    """The index JSON, with a `weight_map` of tensor name -> shard file name."""
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path.name} is not a valid safetensors index: {exc!r}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path.name}: weight_map must map tensor names to file names")
    return index
