"""The stage record (record.json) every stage writes and its downstream stages read.

The other shared pieces have modules named for their job: `runtime` (device, seeding, cache keys,
the tracked run), `training` (accelerate, checkpoints and resume for the training stages),
`sampling` (image generation in resumable blocks, the evaluation samplers) and `codes_file`.
Stages import these and the backends; never each other.
"""

from __future__ import annotations

import json
from pathlib import Path

from proxytune.files import folder_digests, write_json_atomic

RECORD = "record.json"


def read_record(folder: Path) -> dict:
    path = folder / RECORD
    if not path.exists():
        from proxytune.errors import ProxytuneError

        raise ProxytuneError(f"{path}: missing upstream record (run the upstream stage first)")
    return json.loads(path.read_text())


def write_record(folder: Path, record: dict) -> None:
    write_json_atomic(folder / RECORD, record)


def file_digests(folder: Path) -> dict[str, str]:
    return folder_digests(folder)
