"""Progress bars that also read well in a static page (the executed notebooks the book renders)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

#: Set by ``helpers.book`` while it executes chapters: progress is then printed as one plain line per loop,
#: since progress-bar widgets are invisible in a static page.
STATIC_PROGRESS_ENV = "COLLISIONS_STATIC_PROGRESS"


class _TextProgress:
    """tqdm's interface, printing one line when the loop ends (for static pages); nothing if ``leave=False``."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        total: int | None = None,
        desc: str = "",
        disable: bool = False,
        leave: bool = True,
        **_: Any,
    ) -> None:
        self.iterable, self.desc, self.disable, self.leave = iterable, desc, disable, leave
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)  # type: ignore[arg-type]
        self.n, self.start, self.closed = 0, time.perf_counter(), False

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.n += 1
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *_: Any, **__: Any) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave and not self.disable:
            print(
                f"{self.desc}: {self.n}{f'/{self.total}' if self.total else ''} done in "
                f"{time.perf_counter() - self.start:.1f} s",
                file=sys.stdout,
                flush=True,
            )

    def __enter__(self) -> _TextProgress:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """A progress bar: tqdm's (widget in a live notebook, text in a terminal), or, while the book executes
    chapters, one plain line per finished loop (``leave=False`` loops print nothing)."""
    if os.environ.get(STATIC_PROGRESS_ENV) == "1":
        return _TextProgress(iterable, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)
