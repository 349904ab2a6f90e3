from collections.abc import Callable, Mapping, Sequence
from typing import Any

class RecordCodec:
    """Encodes and decodes feature records (streams/adapters/feature_record.py defines the
    format and passes in what each tag, grain and field name means)."""

    def __init__(
        self,
        *,
        tags: tuple[int, int, int, int, int, int, int],
        slot_ms: tuple[int, int, int, int],
        tag_slot: Sequence[int],
        offer_time_scale: int,
        seen_key_bytes: int,
        time_fields: Sequence[str],
        count_fields: Sequence[str],
        offer_field: str,
        memo_max: int,
        field_code: Callable[[str], tuple[int, int, int, str]],
        bucket: Callable[[int, int], tuple[str, float]],
        category: Callable[[int, str], tuple[str, float]],
        expires_at: Callable[[str], float],
    ) -> None: ...
    def encode(self, state: Mapping[str, float], seen: Mapping[bytes, int]) -> bytes: ...
    def decode(self, blob: bytes) -> tuple[dict[str, float], dict[bytes, int], float, Any]: ...
