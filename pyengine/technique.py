"""The technique contract: a Technique ABC, self-validating Options, typed Results."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch

from pyengine.errors import OptionsError, PluginError
from pyengine.option_types import conform, declared_types

if TYPE_CHECKING:
    from pyengine.context import Context

_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def bad_option(option: str, value: Any, expected: str) -> OptionsError:
    """The one-line error for an option: names it, shows the value, says what is expected."""
    return OptionsError(f"option {option}={value!r} is invalid: expected {expected}")


def option(default: Any, doc: str) -> Any:
    """An option field with its one-line doc (shown by ``pyengine techniques``).

    Mutable defaults (lists, dicts) are copied for every instance.
    """
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: copy.copy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class OptionDoc:
    """One option as ``pyengine techniques`` shows it."""

    name: str
    default: Any
    doc: str


@dataclass(frozen=True)
class Options:
    """Base of every technique's options: a frozen dataclass that validates itself.

    Subclasses add fields with defaults and override ``validate`` (raise ``bad_option``); values
    are first checked against the declared field types (``pyengine.option_types``).
    """

    def __post_init__(self) -> None:
        declared = declared_types(type(self))
        for f in fields(self):
            if f.name in declared:  # the declared type first (a bool is a bool), then the option's own checks
                self._set(f.name, conform(f.name, getattr(self, f.name), declared[f.name]))
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

    @classmethod
    def describe(cls) -> list[OptionDoc]:
        """Every option with its default and one-line doc."""
        out = []
        for f in fields(cls):
            default = (
                f.default
                if f.default is not MISSING
                else (f.default_factory() if f.default_factory is not MISSING else None)
            )
            out.append(OptionDoc(f.name, default, str(f.metadata.get("doc", ""))))
        return out

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


def layer_tuple(value: Any, *, single: bool = False, option_name: str = "layers") -> tuple[str, ...]:
    """A ``layers`` option as a tuple of layer references (a string is one layer);
    ``single``: at most one layer (empty: the technique's default)."""
    values = (value,) if isinstance(value, str) else value
    if not isinstance(values, (tuple, list)) or not all(isinstance(v, str) and v for v in values):
        raise bad_option(option_name, value, "a layer reference or a list of them, e.g. 'features.relu2'")
    if single and len(values) > 1:
        raise bad_option(option_name, value, "one layer reference: this technique reads a single layer")
    return tuple(values)


@dataclass(frozen=True)
class RowOptions(Options):
    """The row range every technique that reads rows takes (see ``Context.rows``)."""

    start: int = option(0, "first row analysed")
    stop: int = option(0, "end of the rows analysed (exclusive); 0: to the end")
    batch_size: int = option(64, "rows per step")

    def validate(self) -> None:
        self.require_int("batch_size")
        self.require_int("start", "stop", minimum=0)
        if self.stop and self.stop <= self.start:
            raise bad_option("stop", self.stop, f"0 (the end) or an index > start={self.start}")


_BaseOptions = Options


_HOST_FIELDS = ("rows", "defaults")


@dataclass(frozen=True)
class ColourScale:
    """What a heatmap's colours mean: blue at ``-limit``, white at 0, red at ``+limit``, in ``units``
    (values beyond the limit are drawn at full colour); the report draws it as a colour bar."""

    limit: float
    units: str


@dataclass(frozen=True)
class UnitRef:
    """One unit of a layer (a channel, a neuron) in a table cell: the report links it to the
    unit's page when it has one."""

    layer: str
    unit: int

    def __str__(self) -> str:
        return f"{self.layer}#{self.unit}"


@dataclass(frozen=True)
class Figure:
    """A figure as data; the report renders and escapes it. Give ``image`` or ``lines``.

    A heatmap figure (``pyengine.figures.heatmap_figure``) gives ``image`` (the inputs), ``heat``
    (the heatmap colours, same size, drawn over the inputs with adjustable opacity) and ``scale``.
    """

    title: str
    image: torch.Tensor | None = None  # (H, W) or (C, H, W), values in [0, 1]
    heat: torch.Tensor | None = None  # (3, H, W) heatmap colours over ``image``
    scale: ColourScale | None = None  # what the heat colours mean
    width: int = 0  # pixels the image is shown wide; 0: enlarged up to the page's width
    lines: Mapping[str, Sequence[float]] | None = None  # series name -> y values
    x: Sequence[float] | None = None
    x_labels: Sequence[str] = ()  # a categorical x axis: one label per point (e.g. the layers)
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
    ``rows`` and ``defaults`` are filled by the host: which rows were analysed, how many, from
    where; and the defaults chosen for options left unset (e.g. the layers found in the model).
    """

    figures: tuple[Figure, ...] = ()
    rows: str = ""
    defaults: str = ""

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
            if f.name in _HOST_FIELDS and not value:
                continue  # filled by the host only when there is something to say
            if isinstance(value, (int, float, str, bool)):
                out[f.name] = value
            elif (
                isinstance(value, Mapping)
                and value
                and all(isinstance(v, (int, float, str, bool)) for v in value.values())
            ):
                out.update({f"{f.name}/{key}": v for key, v in value.items()})
        return out

    def lines(self) -> list[str]:
        """The report's lines for this result (default: the summary)."""
        return [self.summary()]

    def table(self) -> tuple[tuple[object, ...], ...]:
        """The result as a table for the report (first row: the header); () when it has none."""
        return ()

    def _repr_html_(self) -> str:
        """In a notebook: the result's report section (its lines, table and figures), images inline."""
        from pyengine.report import FIGURE_STYLE, OPACITY_SCRIPT, SORT_SCRIPT, Section, inline_png, section_html

        title = type(self).__name__.removesuffix("Result") or "Result"
        lines = [*self.lines(), *([f"Rows analysed: {self.rows}."] if self.rows else [])]
        section = Section(title, lines=lines, table=self.table(), figures=list(self.figures))
        style = f"<style>{FIGURE_STYLE}</style>"
        return style + section_html(section, inline_png) + f"<script>{SORT_SCRIPT}{OPACITY_SCRIPT}</script>"

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
    needs_inputs: ClassVar[bool] = False  # run() needs the inputs tensor (ctx.inputs)
    needs_data: ClassVar[bool] = False  # run() reads rows: inputs, ctx.data or ctx.store
    explains_inputs: ClassVar[bool] = False  # one result per input row: the demo gives it a few inputs
    attribution: ClassVar[bool] = False  # an AttributionResult of maps shaped like the inputs, for a
    #   `target` (int, "predicted", "label" or one index per row): smoothgrad and faithfulness use it

    @classmethod
    def check_definition(cls) -> None:
        """Raise PluginError if the class does not follow the contract."""
        where = f"{cls.__module__}.{cls.__qualname__}"
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(f"{where}.name must be a lowercase-dashed string like 'my-technique', got {name!r}")
        if not isinstance(getattr(cls, "summary", None), str):
            raise PluginError(f"{where}.summary must be a one-line string")
        if not (
            isinstance(cls.Options, type) and issubclass(cls.Options, Options) and dataclasses.is_dataclass(cls.Options)
        ):
            raise PluginError(f"{where}.Options must be a dataclass subclassing pyengine.Options")
        if getattr(cls, "__abstractmethods__", None):
            raise PluginError(f"{where} does not implement run(ctx, options)")

    @classmethod
    def options(cls, **values: Any) -> _BaseOptions:
        """Build and validate this technique's options."""
        return cls.Options.from_dict(values, cls.name)

    @abstractmethod
    def run(self, ctx: Context, options: Any) -> Result:
        """Compute the result. Read layers with ``ctx.record`` and rows with ``ctx.rows`` (or
        ``ctx.activations``); any other hook goes through ``ctx.hooks()`` so none is left behind."""
