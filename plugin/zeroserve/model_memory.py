"""How much memory a server needs that holds up to ``--max_loaded_mib`` of models it loads on demand: the
container's memory request and limit that ``zeroserve render --max-loaded-mib`` writes. Pure arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BASELINE_MIB", "ModelMemory"]

# The server process with nothing loaded: interpreter, server stack, ONNX Runtime, s3fs and botocore for a
# repository on S3, gRPC. bench/server_rss.py measures it (bench/README.md has the numbers); this rounds the
# largest measurement up by a quarter.
BASELINE_MIB = 160
# The server's estimate of a model's memory misses some (arena growth on first runs), and unloading one model and
# loading another leaves the heap fragmented: the models get a quarter more than their budget.
MODEL_HEADROOM = (5, 4)
# The server's defaults for requests in flight (--max_inflight_mib): an eighth of the memory limit, and at least
# the largest request body (--max_request_mib, 256).
INFLIGHT_DIVISOR = 8
MAX_REQUEST_MIB = 256
# A request held in flight peaks at about this many times its bytes (body, decoded tensors, outputs, response).
REQUEST_PEAK_FACTOR = 4


@dataclass(frozen=True, slots=True)
class ModelMemory:
    """The memory request and limit, in whole MiB, for a budget of ``max_loaded_mib`` (M) of loaded models.

    - baseline B = ``BASELINE_MIB`` (160): the server with no model loaded;
    - models = ceil(5/4 · M): the budget, plus a quarter for estimate error and heap fragmentation;
    - request R = B + models: what a pod uses at rest once its model budget is full;
    - requests in flight: the server admits request bytes up to I = max(256, L/8) by default, and they peak at
      about 4 · I = max(1024, L/2);
    - limit L = R + 4 · I, solved for L: L = max(R + 1024, 2 · R). Above 2 GiB the in-flight budget grows with
      the limit itself, so half the limit is left to requests.

    For M = 2048: R = 160 + 2560 = 2720 MiB, L = 5440 MiB (in flight: 680 MiB, peaking at 2720 MiB).
    """

    max_loaded_mib: int
    baseline_mib: int = BASELINE_MIB

    def __post_init__(self) -> None:
        if self.max_loaded_mib < 1:
            raise ValueError(f"max_loaded_mib must be at least 1 to size memory from it, got {self.max_loaded_mib}")

    @property
    def models_mib(self) -> int:
        numerator, denominator = MODEL_HEADROOM
        return -(-self.max_loaded_mib * numerator // denominator)

    @property
    def request_mib(self) -> int:
        return self.baseline_mib + self.models_mib

    @property
    def limit_mib(self) -> int:
        rest = self.request_mib
        floor = rest + REQUEST_PEAK_FACTOR * MAX_REQUEST_MIB
        # L = R + F·L/D  =>  L = R·D / (D - F), rounded up to a whole MiB.
        share = -(-rest * INFLIGHT_DIVISOR // (INFLIGHT_DIVISOR - REQUEST_PEAK_FACTOR))
        return max(floor, share)

    @property
    def inflight_mib(self) -> int:
        """The request bytes the server admits at once under this limit (its --max_inflight_mib default)."""
        return max(MAX_REQUEST_MIB, self.limit_mib // INFLIGHT_DIVISOR)
