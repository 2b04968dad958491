"""Progress bars: tqdm where it is installed, a silent stand-in otherwise (offline GPU machines)."""

from __future__ import annotations

from typing import Any

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - exercised only where tqdm is absent

    class tqdm:  # type: ignore[no-redef]
        """The part of tqdm's interface this project uses, doing nothing."""

        def __init__(self, iterable: Any = None, *args: Any, **kwargs: Any) -> None:
            self.iterable = iterable
            self.n = 0

        def __iter__(self):
            return iter(self.iterable)

        def __enter__(self) -> "tqdm":
            return self

        def __exit__(self, *exc: Any) -> None:
            return None

        def update(self, n: int = 1) -> None:
            self.n += n

        def set_postfix(self, *args: Any, **kwargs: Any) -> None:
            return None

        def set_description(self, *args: Any, **kwargs: Any) -> None:
            return None

        def close(self) -> None:
            return None

__all__ = ["tqdm"]
