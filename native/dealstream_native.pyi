from collections.abc import Callable, Mapping

class RecordEncoder:
    """Encodes feature records (streams/adapters/feature_record.py defines the format)."""

    def __init__(
        self,
        *,
        tags: tuple[int, int, int, int, int, int],
        slot_ms: tuple[int, int, int, int],
        offer_time_scale: int,
        memo_max: int,
        field_code: Callable[[str], tuple[int, int, int, str]],
    ) -> None: ...
    def encode(self, state: Mapping[str, float], seen: Mapping[bytes, int]) -> bytes: ...
