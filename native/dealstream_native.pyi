from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any, TypeVar

_Status = TypeVar("_Status")

class CorruptData(ValueError):
    """Bytes that are not what they should be (a feature record, packed values)."""

class RecordCodec:
    """Encodes, decodes and updates feature records (engine/features/record.py defines the
    format and passes in what each tag, grain and field name means)."""

    def __init__(
        self,
        *,
        tags: tuple[int, int, int, int, int, int, int],
        slot_ms: tuple[int, int, int, int],
        retention: tuple[int, int, int, int],
        buckets: Sequence[tuple[str, int] | None],
        offer_time_scale: int,
        seen_key_bytes: int,
        time_fields: Sequence[str],
        count_fields: Sequence[str],
        offer_field: str,
        memo_max: int,
        field_code: Callable[[str], tuple[int, int, int, str]],
        bucket: Callable[[int, int], str],
        category: Callable[[int, str], str],
        expires_at: Callable[[str], float],
        windows: Sequence[tuple[int, int]],
        activity_codes: Sequence[str],
        purchase_code: str,
        session_gap_minutes: int,
        category_days: tuple[int, int],
        purchase_days: int,
        parsed: Callable[[str], tuple[int, int, str, float]],
    ) -> None: ...
    def encode(self, state: Mapping[str, float], seen: Mapping[bytes, int]) -> bytes: ...
    def decode(self, blob: bytes) -> tuple[dict[str, float], dict[bytes, int], float, Any]: ...
    def decode_state(self, blob: bytes) -> dict[str, float]: ...
    def latest_time(self, blob: bytes) -> int: ...
    def seen_key(self, event_id: str) -> bytes: ...
    def context(
        self, state: dict[str, float], now: int
    ) -> tuple[dict[str, list[float]], float, int, dict[str, float], dict[str, float]]: ...
    def apply_updates(
        self,
        records: dict[str, bytes],
        watermarks: dict[tuple[str, int], int],
        updates: Sequence[Any],
        *,
        allowed_lateness_ms: int,
        forgotten: Container[str],
        statuses: Sequence[_Status],
    ) -> tuple[list[_Status], dict[str, bytes | None], list[str], int]: ...

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
    def discount_total(
        self, interacting: Sequence[float], discount_pct: float, start: int, total: float
    ) -> float: ...
    def discount_products(
        self, interacting: Sequence[float], discount_pct: float, start: int, total: float
    ) -> tuple[list[float], float]: ...

class TermNames:
    """The model's input names, held once (``native/src/logistic.rs``): ranks a score's terms."""

    def __init__(self, names: Sequence[str]) -> None: ...
    def top(self, products: Sequence[float], top: int) -> list[tuple[str, float]]:
        """The ``top`` largest terms by magnitude, then name, each ``(name, round(term, 6))``."""

class InputPlan:
    """The purchase model's input row from a feature vector (``native/src/inputs.rs``;
    ``engine/model/inputs.py`` says what each input is)."""

    def __init__(
        self,
        *,
        days: str,
        days_max: float,
        rates: Sequence[str],
        logs: Sequence[str],
        ratios: Sequence[tuple[str, str]],
        plain: Sequence[str],
        scaled: Sequence[tuple[str, float]],
        interactions: Sequence[int],
    ) -> None: ...
    def base(self, features: dict[str, float]) -> list[float]: ...
    def row(self, features: dict[str, float], discount_pct: float) -> list[float]: ...

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

def stable_id(prefix: str, *parts: str) -> str:
    """``prefix`` + the hex of a 12-byte BLAKE2b of the parts' UTF-8 joined by U+001F
    (``native/src/hashing.rs``): a short deterministic id."""

def unit_hash(*parts: str) -> float:
    """An 8-byte BLAKE2b of the parts' UTF-8 joined by U+001F, big-endian, over 2**64: a
    deterministic uniform draw in [0, 1)."""

class PseudonymKey:
    """A pseudonym key (``native/src/hashing.rs``): HMAC-SHA256 with the key's state kept."""

    def __init__(self, key: bytes, key_id: str) -> None: ...
    def of(self, user_id: str) -> str:
        """``<key id>.`` + base64url (no padding) of the first 16 bytes of
        HMAC-SHA256(key, user id's UTF-8)."""
