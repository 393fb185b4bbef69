"""The Train page's form, described without streamlit: which config fields it shows, in which
group, with which widget, label, help, bounds and starting values.

Everything comes from the settings declared beside each TrainConfig field, so the page only
draws what this module lists and a new hyper-parameter needs no page change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import CONFIG_FIELDS, FORM_GROUPS, MAX_NAME_LENGTH, PRESETS, ConfigField, TrainConfig

GROUP_TITLES = {"basics": "Basics", "optimisation": "Optimisation", "data": "Data", "advanced": "Advanced"}
COLUMN_GROUPS = ("basics", "optimisation", "data")  # side by side
FOLDED_GROUP = "advanced"                             # below them, folded
KEY_PREFIX = "tf_"


@dataclass(frozen=True)
class FormField:
    """One widget of the form. Numbers carry bounds of the field's own type (a widget needs
    value, bounds and step all int or all float)."""

    name: str
    key: str
    label: str
    help: str
    group: str
    widget: str                       # text, radio, select, toggle or number
    kind: type = str                  # the field's type: a number widget's value is cast to it
    options: tuple[str, ...] = ()
    option_labels: dict[str, str] | None = None
    min_value: int | float | None = None
    max_value: int | float | None = None
    step: int | float | None = None
    format: str | None = None
    max_chars: int | None = None

    def option_label(self, option: str) -> str:
        return (self.option_labels or {}).get(option, option)


def widget_key(name: str) -> str:
    return KEY_PREFIX + name


def _form_field(item: ConfigField) -> FormField:
    s = item.setting
    low = high = step = None
    if item.kind in (int, float):
        cast = item.kind
        # 0 is allowed when it means "off" even if the real minimum is higher (max per class)
        low = 0 if s.zero_means and (s.min_value or 0) > 0 else s.min_value
        high = s.max_value
        # an open bound is not a value the field takes: offer the nearest one that it does
        if low is not None:
            low = cast(math.nextafter(low, math.inf) if s.min_open else low)
        if high is not None:
            high = cast(math.nextafter(high, -math.inf) if s.max_open else high)
        step = cast(s.step) if s.step is not None else None
    return FormField(
        name=item.name, key=widget_key(item.name), label=item.label, help=s.help, group=s.group or "",
        widget=item.widget, kind=item.kind, options=s.choices, option_labels=s.choice_labels, min_value=low,
        max_value=high, step=step, format=s.format,
        max_chars=MAX_NAME_LENGTH if s.text == "folder name" else None)


FORM_FIELDS: tuple[FormField, ...] = tuple(_form_field(item) for item in CONFIG_FIELDS if item.setting.group)


def form_fields(group: str | None = None) -> list[FormField]:
    """The form's fields in declaration order; only those of `group` when given."""
    if group is not None and group not in FORM_GROUPS:
        raise ValueError(f"unknown form group {group!r}")
    return [f for f in FORM_FIELDS if group is None or f.group == group]


def form_values(config: TrainConfig) -> dict[str, Any]:
    """The widgets' values for a config (None shown as 0 where 0 means off)."""
    values = {}
    for f in FORM_FIELDS:
        value = getattr(config, f.name)
        values[f.name] = 0 if value is None and f.widget == "number" else value
    return values


def preset_form_values(preset: str) -> dict[str, Any]:
    """The form filled from a preset: its values over the defaults, the experiment named after it."""
    config = TrainConfig.from_dict(PRESETS[preset])
    return {**form_values(config), "experiment": preset}


def overrides_from_form(values: dict[str, Any]) -> dict[str, Any]:
    """The config values a submitted form asks for (TrainConfig turns 0 = off into None)."""
    chosen = {f.name: values[f.name] for f in FORM_FIELDS if f.name in values}
    if isinstance(chosen.get("experiment"), str):
        chosen["experiment"] = chosen["experiment"].strip()
    return chosen
