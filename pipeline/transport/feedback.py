"""Operator feedback to a running daemon: the control requests the operator station and
``benchmarks/operator_feedback.py`` both send (one function each, so what is measured is what
the station does). Replies as in docs/messages.md; a refusal comes back as ``ok: false`` with
the daemon's one-line ``error``."""

from __future__ import annotations

from typing import Any

import zmq

from pipeline.transport.request import request


def mark_false_alarm(
    context: zmq.Context, control: str, *, journal: str | None, seq: int, user: str, timeout_s: float = 10.0
) -> dict[str, Any]:
    """ "That is normal": the region of alert ``seq`` of ``journal`` joins the running model's
    memory bank (the daemon's overlay). Reply: ``entry`` (id, kind "normal", user, time, alert,
    rows) and ``apply_s`` (how long until the next frame is scored with it)."""
    return request(
        context,
        control,
        {"cmd": "false_alarm", "journal": journal, "seq": int(seq), "user": user},
        timeout_s=timeout_s,
    )


def label_defect(
    context: zmq.Context,
    control: str,
    *,
    journal: str | None,
    seq: int,
    label: str,
    user: str,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """ "This is a <label>": the defect's pooled region features become an example of class
    ``label``; later alerts carry the class of their nearest examples (or ``unknown``)."""
    return request(
        context,
        control,
        {"cmd": "label", "journal": journal, "seq": int(seq), "class": label, "user": user},
        timeout_s=timeout_s,
    )


def list_overlay(context: zmq.Context, control: str, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """The overlay: ``version``, ``sha256``, ``rows``, ``cap_rows``, ``entries`` (who added what
    and when), ``classes`` (examples per class)."""
    return request(context, control, {"cmd": "overlay"}, timeout_s=timeout_s)


def undo_overlay(
    context: zmq.Context, control: str, *, entry: int, user: str, timeout_s: float = 10.0
) -> dict[str, Any]:
    """Take entry ``entry`` out of the overlay (the model forgets it from the next frame)."""
    return request(context, control, {"cmd": "overlay_undo", "id": int(entry), "user": user}, timeout_s=timeout_s)
