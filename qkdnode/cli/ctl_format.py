"""Values as ``qkdnode ctl`` prints them: a reply as an indented tree, scalars, durations."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO


def print_tree(obj: Any, indent: int = 0, out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    pad = "  " * indent
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, dict | list) and value:
                print(f"{pad}{key}:", file=stream)
                print_tree(value, indent + 1, stream)
            else:
                print(f"{pad}{key}: {scalar(value)}", file=stream)
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict | list):
                print(f"{pad}-", file=stream)
                print_tree(item, indent + 1, stream)
            else:
                print(f"{pad}- {scalar(item)}", file=stream)
    else:
        print(f"{pad}{scalar(obj)}", file=stream)


def scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if not isinstance(value, str) else value


def duration(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d{int(s % 86400 // 3600):02d}h"
