"""The technique contract: a Technique ABC, self-validating Options, typed Results."""

from __future__ import annotations

import dataclasses
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch

from pyengine.errors import OptionsError, PluginError

if TYPE_CHECKING:
    from pyengine.context import Context

_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def bad_option(option: str, value: Any, expected: str) -> OptionsError:
    """The one-line error for an option: names it, shows the value, says what is expected."""
    return OptionsError(f"option {option}={value!r} is invalid: expected {expected}")


@dataclass(frozen=True)
class Options:
    """Base of every technique's options: a frozen dataclass that validates itself.

    Subclasses add fields with defaults and override ``validate`` (raise ``bad_option``).
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``bad_option(...)`` for any invalid field; may normalise via ``_set``."""

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def require_int(self, *names: str, minimum: int = 1) -> None:
        """Each named option must be an integer >= minimum."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
                raise bad_option(name, value, expected)

    def require_number(self, *names: str, positive: bool = False) -> None:
        """Each named option must be a number > 0 (positive) or >= 0."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
                raise bad_option(name, value, "a positive number" if positive else "a non-negative number")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], technique: str = "") -> Self:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        prefix = f"{technique}: " if technique else ""
        if unknown:
            valid = ", ".join(names) or "none"
            raise OptionsError(f"{prefix}unknown option {unknown[0]!r}; valid options: {valid}")
        try:
            return cls(**values)
        except OptionsError as error:
            raise OptionsError(f"{prefix}{error}") from None
        except TypeError as error:  # a required option is missing
            raise OptionsError(f"{prefix}{error}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible view (tensors become lists), stored with every result."""

        def plain(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.tolist()
            if isinstance(value, (tuple, list)):
                return [plain(v) for v in value]
            if isinstance(value, Mapping):
                return {str(k): plain(v) for k, v in value.items()}
            return value

        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class Figure:
    """A figure as data; the report renders and escapes it. Give ``image`` or ``lines``."""

    title: str
    image: torch.Tensor | None = None  # (H, W) or (C, H, W), values in [0, 1]
    lines: Mapping[str, Sequence[float]] | None = None  # series name -> y values
    x: Sequence[float] | None = None
    log_y: bool = False
    xlabel: str = ""
    ylabel: str = ""
    caption: str = ""


Scalar = int | float | str | bool


@dataclass(frozen=True, kw_only=True)
class Result:
    """Base of every technique's result: tensors, scalars and figures.

    Fields holding tensors (or str -> tensor mappings) are stored as HDF5 datasets,
    scalar fields (or str -> scalar mappings) as attributes. Only the host writes them.
    """

    figures: tuple[Figure, ...] = ()

    def arrays(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value
            elif isinstance(value, Mapping) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
                out.update({f"{f.name}/{key}": v for key, v in value.items()})
        return out

    def scalars(self) -> dict[str, Scalar]:
        out: dict[str, Scalar] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float, str, bool)):
                out[f.name] = value
            elif isinstance(value, Mapping) and value and all(isinstance(v, (int, float, str, bool)) for v in value.values()):
                out.update({f"{f.name}/{key}": v for key, v in value.items()})
        return out

    def lines(self) -> list[str]:
        """The report's lines for this result (default: the summary)."""
        return [self.summary()]

    def summary(self) -> str:
        """One human line; techniques override with what matters most."""
        parts = []
        for key, value in self.scalars().items():
            shown = f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)
            parts.append(f"{key}={shown}")
        return ", ".join(parts[:6])


class Technique(ABC):
    """One interpretability technique. Subclasses set the class attributes and ``run``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    needs_inputs: ClassVar[bool] = False  # run() reads ctx.inputs
    needs_data: ClassVar[bool] = False  # run() reads ctx.data or ctx.store
    uses_gradients: ClassVar[bool] = False

    @classmethod
    def check_definition(cls) -> None:
        """Raise PluginError if the class does not follow the contract."""
        where = f"{cls.__module__}.{cls.__qualname__}"
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(f"{where}.name must be a lowercase-dashed string like 'my-technique', got {name!r}")
        if not isinstance(getattr(cls, "summary", None), str):
            raise PluginError(f"{where}.summary must be a one-line string")
        if not (isinstance(cls.Options, type) and issubclass(cls.Options, Options) and dataclasses.is_dataclass(cls.Options)):
            raise PluginError(f"{where}.Options must be a dataclass subclassing pyengine.Options")
        if getattr(cls, "__abstractmethods__", None):
            raise PluginError(f"{where} does not implement run(ctx, options)")

    @classmethod
    def options(cls, **values: Any) -> Options:
        """Build and validate this technique's options."""
        return cls.Options.from_dict(values, cls.name)

    @abstractmethod
    def run(self, ctx: Context, options: Any) -> Result:
        """Compute the result. Hooks must go through ``ctx.hooks()`` so none are left behind."""
