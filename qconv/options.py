"""Method- and format-specific options (``--opt KEY=VALUE``): each Method / FormatWriter class declares the
options it reads; the CLI validates a user's pairs against those declarations, so a new method or format gets
its settings without new global flags (and batch job files pass the same keys)."""

from __future__ import annotations

from dataclasses import dataclass

from qconv.errors import InputError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Option:
    """One setting: ``type`` is int, float, bool or str; ``choices`` restricts str values."""

    name: str
    type: type
    default: object
    help: str
    choices: tuple = ()

    def convert(self, raw: str, owner: str):
        try:
            if self.type is bool:
                low = raw.strip().lower()
                if low not in _TRUE | _FALSE:
                    raise ValueError
                value = low in _TRUE
            else:
                value = self.type(raw)
        except ValueError:
            raise InputError(f"--opt {self.name}={raw}: {owner} expects a {self.type.__name__}") from None
        if self.choices and value not in self.choices:
            raise InputError(f"--opt {self.name}={raw}: {owner} accepts {', '.join(map(str, self.choices))}")
        return value


def parse_pairs(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--opt {p!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def resolve(pairs: dict[str, str] | dict[str, object], owners: list[tuple[str, tuple[Option, ...]]]) -> list[dict]:
    """Split and convert ``pairs`` among ``owners`` ((label, options) each, e.g. ("--method hqq", HQQ.options));
    returns one dict per owner with every declared option (defaults filled in). Unknown keys are an InputError
    naming the keys that are accepted. Non-str values (from job files) are converted from their str form."""
    results: list[dict] = [{o.name: o.default for o in opts} for _, opts in owners]
    for key, raw in pairs.items():
        hit = False
        for (label, opts), res in zip(owners, results):
            for o in opts:
                if o.name == key:
                    res[key] = (
                        raw if (not isinstance(raw, str) and isinstance(raw, o.type)) else o.convert(str(raw), label)
                    )
                    hit = True
        if not hit:
            known = sorted({o.name for _, opts in owners for o in opts})
            where = " and ".join(label for label, _ in owners)
            raise InputError(
                f"--opt {key}: not an option of {where}"
                + (f"; options: {', '.join(known)}" if known else " (it has none)")
            )
    return results


def describe(opts: tuple[Option, ...]) -> list[str]:
    """Help lines for ``qconv methods`` / ``--help``."""
    lines = []
    for o in opts:
        kind = "|".join(map(str, o.choices)) if o.choices else o.type.__name__
        lines.append(f"{o.name}={kind} (default {o.default}): {o.help}")
    return lines
