"""What every mmkit Gradio app shares: command-line flags, launching, and cleaning text that people type.

The apps are scripts (`python apps/NAME.py`); Python puts `apps/` on the path, so they `import _common`.
"""
from __future__ import annotations

import argparse
import io
import itertools
import re
import socket
import tempfile
import unicodedata
from pathlib import Path
from typing import NamedTuple, Sequence

from mmkit.io import atomic_write_bytes


def parse_args(description: str, default_port: int, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """--host (127.0.0.1: only this machine can connect), --port, --share (a public gradio.live link)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1, this machine only; 0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=default_port, help=f"port to listen on (default {default_port})")
    p.add_argument("--share", action="store_true", help="also open a public *.gradio.live link (needs network)")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port {args.port} is not a TCP port; use a number from 1 to 65535")
    return args


def check_port(args: argparse.Namespace) -> None:
    """Exit with a message (status 2) when ``--host`` / ``--port`` cannot be listened on: checked before the models
    load, so a busy port is said at once instead of as a gradio traceback after the wait."""
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)      # as uvicorn binds: TIME_WAIT is no obstacle
            s.bind((args.host, args.port))
    except OSError as e:
        other = args.port + 1 if args.port < 65535 else args.port - 1
        raise SystemExit(f"error: cannot listen on {args.host}:{args.port} ({e.strerror or e}). Another program "
                         f"(or another copy of this app) may be using the port: pick another one with --port {other}, "
                         "or stop what is using it.") from None


def launch(demo, args: argparse.Namespace, concurrency: int = 1) -> None:
    """Queue requests (one model, 2 cores: users wait their turn instead of slowing each other) and serve."""
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)
    except OSError as e:                      # the port was taken while the models loaded
        check_port(args)
        raise SystemExit(f"error: the app could not start on {args.host}:{args.port}: {e}") from None


class OutputPictures:
    """Pictures an app returns, written once each under a name of their own; the apps return these paths.

    Why not return the PIL image: gradio stores a returned PIL image under a name derived from its content and
    rewrites that file on every request, so two concurrent requests that produce the same picture race, and a
    client can download the file while the other request is rewriting it (seen in CI as "peer closed connection
    without sending complete message body"). A path is copied by gradio through a staging file and a rename.
    Only the newest ``keep`` files stay on disk."""

    def __init__(self, prefix: str, keep: int = 256):
        self.folder = Path(tempfile.mkdtemp(prefix=f"mmkit-{prefix}-out-"))
        self.keep = keep
        self._numbers = itertools.count()          # next() on a count is atomic under the GIL: no two share a name

    def save(self, image, stem: str) -> str:
        n = next(self._numbers)
        buf = io.BytesIO()
        image.save(buf, "PNG")
        path = self.folder / f"{stem}-{n}.png"
        atomic_write_bytes(path, buf.getvalue())
        (self.folder / f"{stem}-{n - self.keep}.png").unlink(missing_ok=True)
        return str(path)


# ---------------------------------------------------------------------------------------------------------
# Text people type
# ---------------------------------------------------------------------------------------------------------

class CleanText(NamedTuple):
    text: str            # what the model reads: printable characters, single spaces
    notes: list[str]     # what was changed and why, to show the user (empty when nothing changed)


class InputError(ValueError):
    """Input a person can fix; the apps show its message (as gr.Error) instead of a traceback."""


def _is_symbol(ch: str) -> bool:
    # emoji, pictographs and other symbols (So), plus variation selectors / joiners that glue emoji (Cf / Mn)
    cat = unicodedata.category(ch)
    return cat in ("So", "Cs", "Co") or ch in "\u200d\ufe0f\ufe0e"


def _is_break(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and not _is_symbol(ch)


def clean_text(text: str | None, *, field: str = "prompt", max_chars: int = 300, example: str = "") -> CleanText:
    """Check and tidy a typed text; raise InputError with the fix when nothing usable is left.

    Turns control and invisible characters into spaces, removes emoji / symbols (the world's vocabulary has none),
    collapses whitespace; text without a letter or digit left is refused.
    """
    hint = f" such as: {example}" if example else ""
    if text is None or not str(text).strip():
        raise InputError(f"The {field} is empty. Type one{hint}.")
    text = str(text)
    if len(text) > max_chars:
        raise InputError(f"The {field} has {len(text):,} characters; the limit is {max_chars}. "
                         f"Shorten it to one short sentence{hint}.")
    notes = []
    # control characters, and invisible format characters / line separators (zero-width space, BOM, U+2028), are
    # word breaks: "red\x00circle" and "red\u200bcircle" are two words, not "redcircle"
    controls = sum(_is_break(c) and c not in "\t\n\r" for c in text)
    symbols = sum(_is_symbol(c) for c in text)
    kept = "".join(" " if _is_break(c) else c for c in text if not _is_symbol(c))
    kept = re.sub(r"\s+", " ", kept).strip()
    if not any(unicodedata.category(c)[0] in "LN" for c in kept):
        kept = ""                                 # only punctuation left: no words
    if controls:
        notes.append(f"removed {controls} control character{'s' * (controls > 1)}")
    if symbols:
        notes.append(f"removed {symbols} emoji / symbol{'s' * (symbols > 1)} (the model knows only words)")
    if not kept:
        raise InputError(f"The {field} has no words left after removing emoji and control characters. "
                         f"Type words{hint}.")
    return CleanText(kept, notes)


def unknown_words(tokenizer, text: str) -> list[str]:
    """Words of `text` the tokenizer's vocabulary does not hold whole (split into pieces or [UNK]).

    Chinese is read character by character, so each CJK character counts as a word here.
    """
    vocab = tokenizer.get_vocab()
    words = re.findall(r"[\u3400-\u9fff]|[A-Za-z]+|\d+", text)
    return sorted({w for w in words if w.lower() not in vocab and w not in vocab})
