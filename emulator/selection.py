"""Which checks a run runs (``--only``/``--skip`` globs), validated once against the check names.

The guest's harness applies the selection (``aperture_only``/``aperture_skip``): a check that is not selected
does not run, and a fixture no selected check needs is never set up. The host drops its own checks the same way.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from aperture.guest.abi import CheckName, Env
from aperture.guest.errors import ConfigError

#: What a pattern may hold: check-name characters and glob syntax (no spaces or commas: the guest's lists are
#: comma-separated inside a space-separated environment command).
_PATTERN = re.compile(r"[a-z0-9_.*?\[\]!-]{1,64}")
#: The guest's buffer for each list is 1 KiB.
MAX_LIST_CHARS = 900


@dataclass(frozen=True)
class CheckSelection:
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = [c.value for c in CheckName]
        for kind, patterns in (("only", self.only), ("skip", self.skip)):
            for pattern in patterns:
                if not _PATTERN.fullmatch(pattern):
                    raise ConfigError(f"check pattern {pattern!r} ({kind}): use check names and globs "
                                      "(a-z 0-9 _ . * ? [ ]), e.g. 'dax.*'")
                if not fnmatch.filter(names, pattern):
                    raise ConfigError(f"check pattern {pattern!r} ({kind}) matches no check; the checks are: "
                                      f"{', '.join(sorted(names))}")
            if len(",".join(patterns)) > MAX_LIST_CHARS:
                raise ConfigError(f"too many check patterns ({kind}): at most {MAX_LIST_CHARS} characters")

    @property
    def everything(self) -> bool:
        return not self.only and not self.skip

    def selects(self, name: str) -> bool:
        if self.only and not any(fnmatch.fnmatchcase(name, p) for p in self.only):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.skip)

    def guest_env(self) -> dict[str, str]:
        """The helper's environment for this selection (empty lists too: a restored guest keeps what it was
        last told)."""
        return {Env.ONLY: ",".join(self.only), Env.SKIP: ",".join(self.skip)}
