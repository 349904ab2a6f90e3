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

class LinearTerms:
    """A model's parameters per input, frozen (``native/src/logistic.rs``): the linear score's
    terms, computed as River computes them (``engine/model/scoring.py``)."""

    intercept: float
    weights: tuple[float, ...]

    def __init__(
        self,
        means: Sequence[float],
        sds: Sequence[float | None],
        weights: Sequence[float],
        intercept: float,
    ) -> None: ...
    def total(self, values: Sequence[float], start: int, total: float) -> float: ...
    def products(
        self, values: Sequence[float], start: int, total: float
    ) -> tuple[list[float], float]: ...

class LogisticStep:
    """River's ``StandardScaler | LogisticRegression`` learning step (``engine/model/
    logistic.py`` says which operations, in which order)."""

    intercept: float
    n_iterations: int
    counts: list[float]
    means: list[float]
    variances: list[float]
    weights: list[float]

    def __init__(
        self,
        *,
        counts: Sequence[float],
        means: Sequence[float],
        variances: Sequence[float],
        weights: Sequence[float],
        intercept: float,
        n_iterations: int,
        lr: float,
        intercept_lr: float,
        l2: float,
        clip: float,
        weight_pos: float,
        weight_neg: float,
    ) -> None: ...
    def learn(self, x: Sequence[float], y: bool, w: float) -> None: ...
    def terms(self) -> LinearTerms: ...

def pack_features(features: dict[str, float], names: tuple[str, ...]) -> str | None:
    """The feature vector's values as base64url text when its names are ``names``, in that
    order (``native/src/values.rs``): runs of equal values, integral ones as varint
    differences, others as doubles; bit for bit reversible. None for other names."""

def unpack_features(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """The vector ``pack_features`` packed, named by ``names`` (as many as the text has values);
    ``ValueError`` for any other text."""

def default_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a keyed record (``native/src/
    partition.rs``): murmur2 of the key, made positive, modulo ``partitions``."""
