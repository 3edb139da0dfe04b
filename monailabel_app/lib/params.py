"""Request parameters each task declares (type and range); anything undeclared or out of range is refused.

MONAI Label merges a request's ``params`` JSON into the task request unread, so a client could set any key a task or
MONAI Label reads: file names (``image``, ``model_filename``, ``result_extension``), an MLflow ``tracking_uri``, or
values that crash it (``max_epochs: "abc"``). Tasks here list what they take and :func:`check_params` enforces it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monailabel.utils.others.generic import device_list, device_map

from .errors import InvalidRequest


class Param:
    """A declared parameter; :meth:`check` returns the value or raises :class:`InvalidRequest`."""

    def check(self, name: str, value: Any) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Flag(Param):
    """A JSON boolean."""

    def check(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise InvalidRequest(f"{name} must be true or false, got {value!r}")
        return value


@dataclass(frozen=True)
class Number(Param):
    """An integer (``integer=True``) or finite number in ``[low, high]``."""

    low: float
    high: float
    integer: bool = False

    def check(self, name: str, value: Any) -> int | float:
        kinds = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            kind = "an integer" if self.integer else "a number"
            raise InvalidRequest(f"{name} must be {kind} in [{self.low}, {self.high}], got {value!r}")
        if not self.low <= value <= self.high:
            raise InvalidRequest(f"{name} must be in [{self.low}, {self.high}], got {value!r}")
        return value


@dataclass(frozen=True)
class Choice(Param):
    """One of ``values``; with ``many``, also a list of them (clients echo the option lists that ``/info/`` shows,
    of which MONAI Label uses the first)."""

    values: Sequence[str]
    many: bool = False

    def check(self, name: str, value: Any) -> str | list[str]:
        items = value if self.many and isinstance(value, list) and value else [value]
        if not all(isinstance(v, str) and v in self.values for v in items):
            raise InvalidRequest(f"{name} must be one of {list(self.values)}, got {value!r}")
        return value


@dataclass(frozen=True)
class Text(Param):
    """A short printable string (no control characters), or with ``nullable`` also null."""

    max_length: int = 128
    nullable: bool = False

    def check(self, name: str, value: Any) -> str | None:
        if value is None and self.nullable:
            return value
        if not isinstance(value, str) or len(value) > self.max_length or not value.isprintable():
            raise InvalidRequest(f"{name} must be printable text of at most {self.max_length} characters")
        return value


# Sent by MONAI Label's clients (3D Slicer, OHIF, the Python client) with every request; null unless configured.
CLIENT_PARAMS: dict[str, Param] = {"client_id": Text(nullable=True)}


def check_params(params: Any, declared: Mapping[str, Param], what: str) -> dict[str, Any]:
    """``params`` (a JSON object) with every key declared and every value checked, else :class:`InvalidRequest`."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidRequest(f"{what} params must be a JSON object, got {type(params).__name__}")
    unknown = sorted(str(k) for k in params if k not in declared)
    if unknown:
        raise InvalidRequest(f"{what} does not take {unknown}; it takes {sorted(declared)}")
    return {k: declared[k].check(k, v) for k, v in params.items()}


def device_choice() -> Choice:
    """The devices MONAI Label resolves: the names ``/info/`` lists, ``cpu``, ``cuda`` and ``cuda:N``."""
    names = {"cpu", "cuda", *device_list(), *device_map().values()}
    names |= {f"cuda:{i}" for i in range(torch.cuda.device_count())}
    return Choice(tuple(sorted(names)), many=True)
