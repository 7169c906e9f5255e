"""Summarise py-spy collapsed stacks: `python -m bench.stacks FILE [--top N] [--grep S]`.

Prints the functions with the most samples on the stack (inclusive) and at the
top of the stack (self), as a share of all samples. Idle time (the event loop
waiting in epoll/select) is shown separately so it does not hide the work.
"""

from __future__ import annotations

import argparse
import collections
import re


def load(path: str) -> list[tuple[list[str], int]]:
    out = []
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, n = line.rpartition(" ")
        try:
            out.append((stack.split(";"), int(n)))
        except ValueError:
            continue
    return out


def short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py:123)"
    return re.sub(r"\(([^()]*/)?([^/()]+)\)$", r"(\2)", frame.strip())


def strip_line(frame: str) -> str:
    return re.sub(r":\d+\)$", ")", frame)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--grep", default="", help="only frames containing this text")
    ap.add_argument("--lines", action="store_true", help="keep line numbers (self table)")
    a = ap.parse_args()
    stacks = load(a.file)
    total = sum(n for _, n in stacks)
    idle_pat = re.compile(r"\b(select|poll|epoll|_run_once \(base_events)|sleep\b")
    idle = sum(n for s, n in stacks if s and idle_pat.search(s[-1]))
    incl: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for s, n in stacks:
        seen = set()
        for f in s:
            key = strip_line(short(f))
            if key not in seen:
                seen.add(key)
                incl[key] += n
        if s:
            own[short(s[-1]) if a.lines else strip_line(short(s[-1]))] += n
    print(f"{total} samples; idle (waiting in select/epoll/sleep at the top): "
          f"{idle} ({100 * idle / max(total, 1):.1f}%)\n")
    print("inclusive:")
    for k, n in incl.most_common():
        if a.grep in k:
            print(f"  {100 * n / total:5.1f}%  {k}")
            a.top -= 1
            if a.top <= 0:
                break
    print("\nself:")
    for k, n in own.most_common(25):
        print(f"  {100 * n / total:5.1f}%  {k}")


if __name__ == "__main__":
    main()
