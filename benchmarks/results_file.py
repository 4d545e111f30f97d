"""Each benchmark owns one marked section of benchmarks/RESULTS.md and rewrites only it."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = (
    "# Benchmark results\n\n"
    "Each section is written by the script it names; rerun it after changing the code it "
    "measures. Timings come from shared machines: compare ratios within one section, not "
    "absolute milliseconds across runs.\n"
)


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace the section ``name`` of RESULTS.md with ``body`` (appended if new)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def publish(name: str, text: str, write: bool = True, path: Path = RESULTS) -> None:
    """Print ``text`` and, when ``write``, make it the section ``name`` of RESULTS.md."""
    if write:
        write_section(name, text, path)
    print(text)
