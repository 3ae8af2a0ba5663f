"""The options of model families: how a run's settings become a family's options record.

Each family declares its options as a frozen record (``ModelFamily.options``, e.g. SD3's ``t5`` and
``shift``). A field made with :func:`option` is a setting of a run: a ``TrainConfig`` field of the
same name and default, which says in its metadata which models take it. :func:`make_options`
builds a family's record from settings by name, and refuses a setting that the family does not
take unless it is at its default, naming the setting and the family.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping


def option(default, applies: str, verb: str = "applies to"):
    """A field of a family's options record that a run sets (a ``TrainConfig`` field of the same
    name and default); ``applies`` says which models take it, for the error when another is given it
    (``"<setting> <verb> <applies>; ..."``)."""
    return dataclasses.field(default=default, metadata={"applies": applies, "verb": verb})


def scheduler_option():
    """The ``scheduler`` field of an options record: ``"ddim"`` or ``"dpm"``, a UNet model's sampler."""
    return option("ddim", "UNet models (a flow-matching model samples with its FlowMatchEulerDiscreteScheduler: "
                          "leave scheduler at its default)")


def settings_of(records: Iterable[type]) -> dict[str, dataclasses.Field]:
    """Every setting the options records take, by name: the field of the first record declaring it."""
    out: dict[str, dataclasses.Field] = {}
    for record in records:
        for f in dataclasses.fields(record):
            if "applies" in f.metadata:
                out.setdefault(f.name, f)
    return out


def label(name: str, value) -> str:
    """How a setting's value reads in a message: ``no_t5`` (a flag turned off), ``scheduler 'dpm'``, ``shift``."""
    if isinstance(value, bool):
        return name if value else f"no_{name}"
    return f"{name} {value!r}" if isinstance(value, str) else name


def make_options(record: type, title: str, what: str, settings: Mapping[str, Any],
                 known: Mapping[str, dataclasses.Field]) -> Any:
    """The options ``record`` of a family (called ``title`` in messages, ``"a FLUX.1 model"``) from
    ``settings`` by name.

    A setting the record lacks is ignored at its default (``known``: every setting of every family,
    :func:`settings_of`) and refused otherwise; the record's ``__post_init__`` checks its own values.

    Raises:
      ValueError: a setting the family does not take (``"no_t5 applies to SD3 models; 'x' is a FLUX.1
        model"``), or a value it refuses.
      TypeError: a setting no family takes.
    """
    own = {f.name for f in dataclasses.fields(record)}
    for name, value in settings.items():
        if name in own:
            continue
        if name not in known:
            raise TypeError(f"unknown model option {name!r}; known: {', '.join(sorted(known))}")
        if value != known[name].default:
            meta = known[name].metadata
            raise ValueError(f"{label(name, value)} {meta['verb']} {meta['applies']}; {what} is {title}")
    return record(**{k: v for k, v in settings.items() if k in own})
