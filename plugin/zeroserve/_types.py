"""Type aliases shared by the client and the framework adapters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeAlias

#: A tensor as the caller gives it: a numpy array, a nested list, or a scalar.
ArrayLike: TypeAlias = Any
#: Input name -> tensor.
Inputs: TypeAlias = Mapping[str, ArrayLike]
#: Header name -> value.
Headers: TypeAlias = Mapping[str, str]
#: What a mounted route does while the model service is cold: hold the request until it wakes, or
#: answer 503 with Retry-After at once (and wake it in the background).
WhenCold: TypeAlias = Literal["hold", "reject"]
