"""The embedded default's text: the English help topics that ship with Python (`pydoc_data.topics`), split
deterministically into a training part and a held-out part (whole topics, so no held-out sentence is ever seen).

The held-out topics are every HELDOUT_EVERY-th topic in sorted order, starting at HELDOUT_OFFSET. The text differs a
little between Python versions, so the training script writes the held-out documents it used next to the
checkpoint (`heldout.json`), and the perplexity check reads that file, never pydoc_data.
"""

from __future__ import annotations

HELDOUT_EVERY = 16
HELDOUT_OFFSET = 3  # atom-identifiers, class, for, numeric-types, try: ~20 kB of ~465 kB


def topics() -> dict[str, str]:
    """{topic name: text}, sorted by name, whitespace at both ends stripped."""
    from pydoc_data.topics import topics as raw

    return {name: raw[name].strip() for name in sorted(raw)}


def split() -> tuple[dict[str, str], dict[str, str]]:
    """(training topics, held-out topics)."""
    train, held = {}, {}
    for i, (name, text) in enumerate(topics().items()):
        (held if i % HELDOUT_EVERY == HELDOUT_OFFSET else train)[name] = text
    return train, held
